"""Named components collected from every plugin's registration hooks."""

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
    "advantage": "aligntk_register_advantages",
    "kl": "aligntk_register_kl_estimators",
    "aggregation": "aligntk_register_aggregations",
}


@dataclass(frozen=True)
class Registered:
    """One component: its kind, name, class, and the plugin that registered it."""

    kind: str
    name: str
    cls: type
    plugin: str


@dataclass
class Registry:
    """Components by kind and name. A name registered twice is an error naming both plugins."""

    components: dict[str, dict[str, Registered]] = field(default_factory=lambda: {k: {} for k in KINDS})
    #: Every plugin that loaded cleanly, and the options model it registered (None: none).
    plugin_options: dict[str, type | None] = field(default_factory=dict)

    def add(self, kind: str, name: str, cls: type, plugin: str) -> None:
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {plugin!r} registered a {kind} with an invalid name {name!r}")
        if not hasattr(cls, "Config"):
            raise PluginError(f"plugin {plugin!r}: {kind} {name!r} ({cls!r}) has no Config options model")
        existing = self.components[kind].get(name)
        if existing is not None:
            raise DuplicateComponentError(
                f"{kind} {name!r} is registered twice: by plugin {existing.plugin!r} and by plugin {plugin!r}; "
                "uninstall one of them or rename its component"
            )
        self.components[kind][name] = Registered(kind, name, cls, plugin)

    def get(self, kind: str, name: str, key_path: str) -> Registered:
        """The component ``name`` of ``kind``; ``key_path`` is the recipe key that named it."""
        known = self.components[kind]
        if name in known:
            return known[name]
        raise RecipeError(f"{key_path}: {self.unknown(kind, name)}")

    def unknown(self, kind: str, name: str) -> str:
        """``unknown <kind> 'x', did you mean 'y'? (installed: ...)``."""
        known = self.components[kind]
        close = difflib.get_close_matches(name, known, n=1)
        hint = f", did you mean {close[0]!r}?" if close else ""
        names = ", ".join(sorted(known)) or "none"
        return f"unknown {kind} {name!r}{hint} (installed: {names})"

    def by_plugin(self, plugin: str) -> list[Registered]:
        return [r for kind in self.components.values() for r in kind.values() if r.plugin == plugin]
