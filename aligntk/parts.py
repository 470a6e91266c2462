"""Parts: components chosen inside another component's options.

A plugin may give its components sub-components that recipes choose by name, such as
the RL plugin's KL estimators, loss aggregations and advantage estimators, shared by
every online method. It registers them as parts of a kind it chooses
(``aligntk_register_parts``: ``register("kl", "k3", K3)``), and any plugin's option
names one::

    class MyLossConfig(ComponentConfig):
        kl: part("kl") = "k3"

A recipe then writes ``kl: k1`` or, with options, ``advantage: {name: gae, lam: 0.9}``.
The option is checked like any component section (unknown name or option: an error
naming the key) and holds a ``Part``; ``config.kl.build()`` makes the component.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import Field, PlainSerializer, PlainValidator, ValidationError, ValidationInfo

from .types import ComponentConfig


@dataclass(frozen=True)
class Part:
    """A chosen component: its kind, registered name, class and checked options."""

    kind: str
    name: str
    cls: type
    config: ComponentConfig

    def build(self) -> Any:
        return self.cls(self.config)

    def dump(self) -> dict[str, Any]:
        return {"name": self.name, **self.config.model_dump(mode="json")}


@dataclass(frozen=True)
class PartOf:
    """Marks an option as naming a component of ``kind`` (for ``aligntk plugins --verbose``)."""

    kind: str


@functools.cache
def _installed_registry() -> Any:
    """The registry of installed plugins, for configs built outside a recipe (tests, scripts)."""
    from .plugins import load_plugins

    return load_plugins().registry


def _choose(kind: str, value: Any, info: ValidationInfo) -> Part:
    if isinstance(value, Part):
        return value
    if isinstance(value, str):
        name, options = value, {}
    elif isinstance(value, dict) and isinstance(value.get("name"), str):
        options = dict(value)
        name = options.pop("name")
    else:
        raise ValueError(f"expected the name of a {kind} component, or a mapping with 'name' and its options")
    context = info.context or {}
    registry = context.get("registry") or _installed_registry()
    found = registry.components.get(kind, {}).get(name)
    if found is None:
        raise ValueError(registry.unknown(kind, name))
    try:
        config = found.cls.Config.model_validate(options, context=context)
    except ValidationError as exc:
        from .recipe import format_errors

        raise ValueError(f"{kind} {name!r}: {format_errors(exc, found.cls.Config, ())}") from None
    return Part(kind, name, found.cls, config)


def part(kind: str) -> Any:
    """The type of an option that names a registered part of ``kind`` (``"kl"`` ...), or a component."""
    return Annotated[
        Part,
        PartOf(kind),
        PlainValidator(functools.partial(_choose, kind)),
        PlainSerializer(lambda p: p.dump(), return_type=dict),
        Field(validate_default=True),
    ]
