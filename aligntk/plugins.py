"""The plugin manager: loads every ``aligntk`` entry point and reports broken ones.

A plugin that fails to import, implements a hook that does not exist, or raises in
its registration hook is recorded as broken (with its distribution and error) and
left out; the rest keep working.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pluggy

from . import hookspecs
from .errors import DuplicateComponentError, PluginError
from .registry import KINDS, Registry

hookimpl = pluggy.HookimplMarker("aligntk")
ENTRY_POINT_GROUP = "aligntk"
SUITES_HOOK = "aligntk_register_suites"
OPTIONS_HOOK = "aligntk_register_options"
PARTS_HOOK = "aligntk_register_parts"


@dataclass
class PluginInfo:
    """A loaded or broken plugin, as ``aligntk plugins`` lists it."""

    name: str
    distribution: str
    version: str
    error: str | None = None


@dataclass(frozen=True)
class RegisteredSuite:
    """A benchmark suite file a plugin registered by name (``aligntk bench NAME``)."""

    name: str
    path: Path
    plugin: str


@dataclass
class Plugins:
    """The loaded plugins, their components and suites, and the typed lifecycle calls."""

    pm: pluggy.PluginManager
    registry: Registry
    infos: list[PluginInfo] = field(default_factory=list)
    suites: dict[str, RegisteredSuite] = field(default_factory=dict)
    #: Plugins whose lifecycle hooks this view does not call (``enabled: false`` in a recipe).
    disabled: frozenset[str] = frozenset()

    def without(self, names: set[str] | frozenset[str]) -> Plugins:
        """The same plugins, with the lifecycle hooks of ``names`` left uncalled."""
        return dataclasses.replace(self, disabled=frozenset(names))

    def _hook(self, name: str) -> Any:
        if not self.disabled:
            return getattr(self.pm.hook, name)
        off = [p for n in self.disabled if (p := self.pm.get_plugin(n)) is not None]
        return self.pm.subset_hook_caller(name, remove_plugins=off)

    @property
    def broken(self) -> list[PluginInfo]:
        return [p for p in self.infos if p.error is not None]

    def lifecycle_hooks(self, name: str) -> list[str]:
        """The lifecycle hooks plugin ``name`` implements (``on_step_end`` ...)."""
        plugin = self.pm.get_plugin(name)
        if plugin is None:
            return []
        callers = self.pm.get_hookcallers(plugin) or []
        registration = {*KINDS.values(), "aligntk_register_commands", PARTS_HOOK, SUITES_HOOK, OPTIONS_HOOK}
        return sorted(c.name.removeprefix("aligntk_") for c in callers if c.name not in registration)

    def versions(self) -> dict[str, str]:
        return {p.name: f"{p.distribution} {p.version}" for p in self.infos if p.error is None}

    # Typed wrappers around the untyped pm.hook calls.
    def on_run_start(self, run: Any) -> None:
        self._hook("aligntk_on_run_start")(run=run)

    def on_step_end(self, run: Any, step: int, metrics: dict[str, float]) -> str | None:
        reasons = [r for r in self._hook("aligntk_on_step_end")(run=run, step=step, metrics=metrics) if r]
        return "; ".join(reasons) or None

    def on_eval_end(self, run: Any, step: int, metrics: dict[str, float]) -> None:
        self._hook("aligntk_on_eval_end")(run=run, step=step, metrics=metrics)

    def on_checkpoint_saved(self, run: Any, step: int, path: Any) -> None:
        self._hook("aligntk_on_checkpoint_saved")(run=run, step=step, path=path)

    def on_run_end(self, run: Any, metrics: dict[str, Any], error: BaseException | None) -> None:
        self._hook("aligntk_on_run_end")(run=run, metrics=metrics, error=error)


def _error_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def load_plugins(extra: dict[str, object] | None = None) -> Plugins:
    """Load every installed ``aligntk`` plugin, plus ``extra`` plugin objects by name.

    ``extra`` is for tests and embedding: objects registered exactly like entry points.
    """
    pm = pluggy.PluginManager("aligntk")
    pm.add_hookspecs(hookspecs)
    infos: list[PluginInfo] = []
    candidates: list[tuple[PluginInfo, Any]] = []

    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist = ep.dist.name if ep.dist else "?"
        version = ep.dist.version if ep.dist else "?"
        info = PluginInfo(ep.name, dist, version)
        infos.append(info)
        try:
            candidates.append((info, ep.load()))
        except Exception as exc:  # a broken third-party import must not break the CLI
            info.error = f"failed to import {ep.value!r}: {_error_line(exc)}"
    for name, obj in (extra or {}).items():
        info = PluginInfo(name, "(in-process)", "-")
        infos.append(info)
        candidates.append((info, obj))

    loaded: dict[str, Any] = {}  # plugin name -> object, for plugins that registered cleanly
    for info, obj in candidates:
        if info.name in loaded:
            first = next(i for i in infos if i.name == info.name and i.error is None)
            info.error = f"plugin name {info.name!r} is taken by {first.distribution}; rename one entry point"
            continue
        try:
            pm.register(obj, name=info.name)
            pm.check_pending()  # a hookimpl that matches no hookspec fails loudly
        except (pluggy.PluginValidationError, ValueError) as exc:
            if pm.get_plugin(info.name) is obj:  # not an object already loaded under another name
                pm.unregister(obj)
            info.error = _error_line(exc)
            continue
        loaded[info.name] = obj

    registry = Registry()
    suites: dict[str, RegisteredSuite] = {}
    adders = {hook: functools.partial(_register, registry, kind) for kind, hook in KINDS.items()}
    adders[PARTS_HOOK] = functools.partial(_register_part, registry)
    adders[SUITES_HOOK] = functools.partial(_register_suite, suites)
    adders[OPTIONS_HOOK] = functools.partial(_register_options, registry)
    failed: set[str] = set()
    for hook_name, add in adders.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            info = next(i for i in infos if i.name == impl.plugin_name and i.error is None)
            if impl.hookwrapper or impl.wrapper:
                info.error = f"{hook_name} must be a plain hook, not a wrapper"
            else:
                try:
                    impl.function(register=functools.partial(add, impl.plugin_name))
                    continue
                except DuplicateComponentError:
                    raise  # the user's install problem: name both plugins
                except Exception as exc:
                    info.error = f"{hook_name} raised {_error_line(exc)}"
            failed.add(info.name)
    # A plugin whose registration failed contributes nothing, not half its components.
    for name in failed:
        for reg in registry.by_plugin(name):
            del registry.components[reg.kind][reg.name]
        for suite in [s for s in suites.values() if s.plugin == name]:
            del suites[suite.name]
        registry.plugin_options.pop(name, None)
        pm.unregister(loaded.pop(name))
    for name in loaded:
        registry.plugin_options.setdefault(name, None)
    return Plugins(pm, registry, infos, suites)


def _register(registry: Registry, kind: str, plugin: str, name: str, cls: type) -> None:
    registry.add(kind, name, cls, plugin)


def _register_part(registry: Registry, plugin: str, kind: str, name: str, cls: type) -> None:
    """A nested part of a kind the plugin defines (``register(kind, name, cls)``)."""
    registry.add_part(kind, name, cls, plugin)


def _register_options(registry: Registry, plugin: str, cls: type) -> None:
    """A lifecycle plugin's options model, for its ``plugins: {<plugin>: ...}`` recipe section."""
    from pydantic import BaseModel

    if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
        raise PluginError(f"plugin {plugin!r}: aligntk_register_options takes a pydantic model class, got {cls!r}")
    if "enabled" in cls.model_fields:
        raise PluginError(f"plugin {plugin!r}: its options model declares 'enabled', which aligntk handles itself")
    if registry.plugin_options.get(plugin) is not None:
        raise PluginError(f"plugin {plugin!r} registered its options twice")
    registry.plugin_options[plugin] = cls


def _register_suite(suites: dict[str, RegisteredSuite], plugin: str, name: str, path: str | Path) -> None:
    """Suites have no ``Config``: a name and a YAML file, in their own table."""
    if not isinstance(name, str) or not name:
        raise PluginError(f"plugin {plugin!r} registered a suite with an invalid name {name!r}")
    if not isinstance(path, (str, Path)):
        raise PluginError(f"plugin {plugin!r}: suite {name!r} path must be a str or Path, got {type(path).__name__}")
    existing = suites.get(name)
    if existing is not None:
        raise DuplicateComponentError(
            f"suite {name!r} is registered twice: by plugin {existing.plugin!r} and by plugin {plugin!r}; "
            "uninstall one of them or rename its suite"
        )
    suites[name] = RegisteredSuite(name, Path(path), plugin)
