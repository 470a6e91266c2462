"""Reading what a component declares it needs and provides, once, when the recipe is validated.

Each component kind with optional behaviour has one typed declaration
(:class:`~aligntk.types.DataCapabilities`, :class:`~aligntk.types.LossCapabilities`,
:class:`~aligntk.types.EvaluatorCapabilities`), returned by an optional
``capabilities(config)`` classmethod. The engine reads only the declaration; it never
looks for optional members. What the declaration names must exist, and a component
that has an optional member but declares nothing is refused, since that member would
otherwise be ignored without a word.
"""

from __future__ import annotations

from typing import Any

from .errors import PluginError
from .types import DataCapabilities, EvaluatorCapabilities, LossCapabilities

_DECLARATIONS: dict[str, type] = {
    "data": DataCapabilities,
    "loss": LossCapabilities,
    "evaluator": EvaluatorCapabilities,
}
#: Capability flag -> the method it promises.
_METHODS = {"precompute": "precompute", "heads": "heads", "scheduled": "start_step", "online": "rollout", "samples": "samples"}
#: Optional members the engine once looked for; a component that still has them must declare them.
_UNDECLARED = {
    "data": ("rollout", "provided_fields", "iterations"),
    "loss": ("precompute", "heads", "start_step", "whole_batch", "live_roles"),
    "evaluator": ("requires",),
}


def capabilities_of(kind: str, name: str, cls: type, config: Any) -> Any:
    """The declaration of component ``name`` of ``kind`` with ``config``; None for kinds without one.

    Raises:
        PluginError: the declaration is of the wrong type, names a method the class lacks,
            or the class has optional members but declares no capabilities.
    """
    declaration = _DECLARATIONS.get(kind)
    if declaration is None:
        return None
    declare = getattr(cls, "capabilities", None)
    if declare is None:
        found = [m for m in _UNDECLARED[kind] if hasattr(cls, m)]
        if found:
            raise PluginError(
                f"{kind} {name!r} ({cls.__qualname__}) has {', '.join(found)} but declares no "
                f"capabilities(config); return a {declaration.__name__} naming what it uses"
            )
        return declaration()
    caps = declare(config)
    if not isinstance(caps, declaration):
        raise PluginError(
            f"{kind} {name!r}: capabilities(config) returned {type(caps).__name__}, expected {declaration.__name__}"
        )
    for flag, method in _METHODS.items():
        if getattr(caps, flag, False) and not callable(getattr(cls, method, None)):
            raise PluginError(f"{kind} {name!r} declares {flag} but defines no {method}()")
    if isinstance(caps, DataCapabilities) and (caps.iterations < 1 or (caps.iterations > 1 and not caps.online)):
        raise PluginError(f"data {name!r}: iterations {caps.iterations} needs online data and a value of at least 1")
    return caps
