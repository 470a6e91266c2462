"""Named components collected from every plugin's registration hooks.

Two sorts share one table, ``components[kind][name]``: components of the kinds below,
which a recipe section names (``loss: {name: sft}``), and parts, of kinds a plugin
defines (``aligntk_register_parts``), which a component's option names (``part(kind)``).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from .errors import DuplicateComponentError, PluginError, RecipeError

#: Component kinds, in the order ``aligntk plugins`` lists them, and their hook names.
KINDS: dict[str, str] = {
    "data": "aligntk_register_data",
    "loss": "aligntk_register_losses",
    "update": "aligntk_register_update_steps",
    "reward": "aligntk_register_rewards",
    "evaluator": "aligntk_register_evaluators",
}


@dataclass(frozen=True)
class Registered:
    """One component: its kind, name, class, the plugin that registered it, and whether it is a part."""

    kind: str
    name: str
    cls: type
    plugin: str
    part: bool = False


@dataclass
class Registry:
    """Components by kind and name. A name registered twice is an error naming both plugins."""

    components: dict[str, dict[str, Registered]] = field(default_factory=lambda: {k: {} for k in KINDS})
    #: Every plugin that loaded cleanly, and the options model it registered (None: none).
    plugin_options: dict[str, type | None] = field(default_factory=dict)

    def add(self, kind: str, name: str, cls: type, plugin: str, part: bool = False) -> None:
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {plugin!r} registered a {kind} with an invalid name {name!r}")
        if not hasattr(cls, "Config"):
            raise PluginError(f"plugin {plugin!r}: {kind} {name!r} ({cls!r}) has no Config options model")
        existing = self.components.setdefault(kind, {}).get(name)
        if existing is not None:
            raise DuplicateComponentError(
                f"{kind} {name!r} is registered twice: by plugin {existing.plugin!r} and by plugin {plugin!r}; "
                "uninstall one of them or rename its component"
            )
        self.components[kind][name] = Registered(kind, name, cls, plugin, part)

    def add_part(self, kind: str, name: str, cls: type, plugin: str) -> None:
        """A part of a plugin-defined ``kind`` (``aligntk_register_parts``); its kind may not be a component kind."""
        if not isinstance(kind, str) or not kind:
            raise PluginError(f"plugin {plugin!r} registered part {name!r} with an invalid kind {kind!r}")
        if kind in KINDS:
            raise PluginError(
                f"plugin {plugin!r} registered part {name!r} of kind {kind!r}, which is a component kind; "
                f"register it with {KINDS[kind]}, or give the part a kind of its own"
            )
        self.add(kind, name, cls, plugin, part=True)

    def part_kinds(self) -> list[str]:
        """The kinds of the registered parts, sorted."""
        return sorted(kind for kind, known in self.components.items() if any(r.part for r in known.values()))

    def get(self, kind: str, name: str, key_path: str) -> Registered:
        """The component ``name`` of ``kind``; ``key_path`` is the recipe key that named it."""
        known = self.components.get(kind, {})
        if name in known:
            return known[name]
        raise RecipeError(f"{key_path}: {self.unknown(kind, name)}")

    def unknown(self, kind: str, name: str) -> str:
        """``unknown <kind> 'x', did you mean 'y'? (installed: ...)``.

        For a kind no plugin registers anything of: ``unknown <kind> 'x': no installed
        plugin registers parts of kind '<kind>'``, with the closest registered kind.
        """
        known = self.components.get(kind)
        if not known and kind not in KINDS:
            kinds = self.part_kinds()
            close = difflib.get_close_matches(kind, kinds, n=1)
            hint = f", did you mean kind {close[0]!r}?" if close else ""
            return (
                f"unknown {kind} {name!r}: no installed plugin registers parts of kind {kind!r}{hint} "
                f"(part kinds: {', '.join(kinds) or 'none'})"
            )
        known = known or {}
        close = difflib.get_close_matches(name, known, n=1)
        hint = f", did you mean {close[0]!r}?" if close else ""
        names = ", ".join(sorted(known)) or "none"
        return f"unknown {kind} {name!r}{hint} (installed: {names})"

    def by_plugin(self, plugin: str) -> list[Registered]:
        return [r for kind in self.components.values() for r in kind.values() if r.plugin == plugin]
