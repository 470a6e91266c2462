"""The plugin manager with in-process plugins: duplicate names, unknown hooks, raising hooks.

``load_plugins(extra=...)`` registers plain objects exactly like entry points, next to
every installed plugin, so each test also checks that the built-in ones keep working.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from aligntk import ComponentConfig, PluginError, RunInfo, hookimpl, load_plugins, part


class _Loss:
    """A stand-in component: the registry only needs a class with ``Config``."""

    Config = ComponentConfig


class _Data:
    Config = ComponentConfig


class GoodPlugin:
    """A healthy plugin: one loss, and a step hook that records what it saw."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    @hookimpl
    def aligntk_register_losses(self, register: Any) -> None:
        register("good_loss", _Loss)

    @hookimpl
    def aligntk_on_step_end(self, run: Any, step: int, metrics: dict[str, float]) -> None:
        self.steps.append(step)


class DuplicateSFT:
    @hookimpl
    def aligntk_register_losses(self, register: Any) -> None:
        register("sft", _Loss)


class MisspelledHook:
    """Implements a hook that does not exist; its valid hooks must not run either."""

    @hookimpl
    def aligntk_register_losses(self, register: Any) -> None:
        register("typo_loss", _Loss)

    @hookimpl
    def aligntk_on_step_ended(self, run: Any, step: int, metrics: dict[str, float]) -> None:
        raise AssertionError("a hook that matches no spec must never be called")


class RaisingRegistration:
    """Registers a data component, then raises while registering losses."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    @hookimpl
    def aligntk_register_data(self, register: Any) -> None:
        register("raising_data", _Data)

    @hookimpl
    def aligntk_register_losses(self, register: Any) -> None:
        register("raising_loss", _Loss)
        raise ValueError("boom")

    @hookimpl
    def aligntk_on_step_end(self, run: Any, step: int, metrics: dict[str, float]) -> None:
        self.steps.append(step)


def run_info(tmp_path: Path) -> RunInfo:
    """A run as lifecycle hooks see it (the built-in console reporter reads it too)."""
    return RunInfo(
        tmp_path, {}, max_steps=3, start_step=0, world_size=1, device="cpu", trainable_parameters=1, total_parameters=1
    )


def broken_names(plugins: Any) -> dict[str, str]:
    return {info.name: info.error for info in plugins.broken}


def assert_builtins_work(plugins: Any) -> None:
    components = plugins.registry.components
    assert components["loss"]["sft"].plugin == "sft"
    assert components["data"]["sft"].plugin == "sft"
    assert "full" in components["update"]


def test_extra_plugin_is_loaded_next_to_installed_ones():
    good = GoodPlugin()
    plugins = load_plugins(extra={"good": good})
    assert plugins.registry.components["loss"]["good_loss"].plugin == "good"
    assert "good" not in broken_names(plugins)
    assert_builtins_work(plugins)
    info = next(i for i in plugins.infos if i.name == "good")
    assert (info.distribution, info.error) == ("(in-process)", None)


def test_duplicate_name_is_an_error_naming_both_plugins():
    with pytest.raises(PluginError) as excinfo:
        load_plugins(extra={"dup_sft": DuplicateSFT()})
    message = str(excinfo.value)
    assert "'sft'" in message and "'dup_sft'" in message
    assert "plugin 'sft'" in message and "plugin 'dup_sft'" in message
    assert "registered twice" in message


def test_misspelled_hook_marks_plugin_broken_and_others_keep_working(tmp_path):
    good = GoodPlugin()
    plugins = load_plugins(extra={"typo": MisspelledHook(), "good": good})

    broken = broken_names(plugins)
    assert "typo" in broken and "aligntk_on_step_ended" in broken["typo"]
    assert "good" not in broken
    assert plugins.pm.get_plugin("typo") is None
    losses = plugins.registry.components["loss"]
    assert "typo_loss" not in losses  # its valid hooks are not called either
    assert losses["good_loss"].plugin == "good"
    assert_builtins_work(plugins)

    # Lifecycle hooks still reach the healthy plugin, and never the misspelled one.
    assert plugins.on_step_end(run=run_info(tmp_path), step=1, metrics={"loss": 1.0}) is None
    assert good.steps == [1]


def test_raising_registration_hook_marks_plugin_broken_with_no_components(tmp_path):
    good, raising = GoodPlugin(), RaisingRegistration()
    plugins = load_plugins(extra={"raising": raising, "good": good})

    broken = broken_names(plugins)
    assert "raising" in broken
    assert "aligntk_register_losses" in broken["raising"] and "ValueError: boom" in broken["raising"]
    assert plugins.registry.by_plugin("raising") == []  # not even the data it registered first
    assert "raising_data" not in plugins.registry.components["data"]
    assert "raising_loss" not in plugins.registry.components["loss"]
    assert plugins.registry.components["loss"]["good_loss"].plugin == "good"
    assert_builtins_work(plugins)
    assert "raising" not in plugins.versions() and "good" in plugins.versions()

    plugins.on_step_end(run=run_info(tmp_path), step=3, metrics={"loss": 1.0})
    assert good.steps == [3] and raising.steps == []


# --------------------------------------------------------------------------------------
# Parts: nested components of kinds a plugin defines (aligntk_register_parts)
# --------------------------------------------------------------------------------------


class _Scaler:
    """A part of a kind this test's plugin makes up: ``scaler``."""

    class Config(ComponentConfig):
        factor: float = 2.0

    def __init__(self, config: Any) -> None:
        self.config = config


class ScalerPlugin:
    """Defines a part kind of its own, and a loss whose option names one of them."""

    @hookimpl
    def aligntk_register_parts(self, register: Any) -> None:
        register("scaler", "double", _Scaler)

    @hookimpl
    def aligntk_register_losses(self, register: Any) -> None:
        register("scaled_loss", _ScaledLoss)


class _ScaledLoss:
    class Config(ComponentConfig):
        scaler: part("scaler") = "double"


class AnotherDouble:
    @hookimpl
    def aligntk_register_parts(self, register: Any) -> None:
        register("scaler", "double", _Scaler)


class PartOfAComponentKind:
    @hookimpl
    def aligntk_register_parts(self, register: Any) -> None:
        register("loss", "sneaky", _Loss)


def test_a_plugin_defined_part_kind_is_registered_and_chosen_by_name() -> None:
    plugins = load_plugins(extra={"scalers": ScalerPlugin()})
    found = plugins.registry.components["scaler"]["double"]
    assert (found.cls, found.plugin, found.part) == (_Scaler, "scalers", True)
    assert "scaler" in plugins.registry.part_kinds()
    context = {"registry": plugins.registry}
    chosen = _ScaledLoss.Config.model_validate({"scaler": {"name": "double", "factor": 3.0}}, context=context)
    assert chosen.scaler.build().config.factor == 3.0
    with pytest.raises(ValueError, match=r"unknown scaler 'dubble', did you mean 'double'\?"):
        _ScaledLoss.Config.model_validate({"scaler": "dubble"}, context=context)


def test_a_part_of_a_kind_nobody_registers_says_so_with_the_closest_kind() -> None:
    registry = load_plugins(extra={"scalers": ScalerPlugin()}).registry
    message = registry.unknown("scalr", "double")
    assert "no installed plugin registers parts of kind 'scalr', did you mean kind 'scaler'?" in message
    assert "kl" in message and "advantage" in message  # the RL plugin's kinds are listed too


def test_a_part_name_registered_twice_is_an_error_naming_both_plugins() -> None:
    with pytest.raises(PluginError, match=r"scaler 'double' is registered twice: by plugin 'one' and by plugin 'two'"):
        load_plugins(extra={"one": ScalerPlugin(), "two": AnotherDouble()})


def test_a_part_may_not_take_a_component_kind() -> None:
    plugins = load_plugins(extra={"sneaky": PartOfAComponentKind()})
    error = broken_names(plugins)["sneaky"]
    assert "aligntk_register_parts" in error and "kind 'loss', which is a component kind" in error
    assert "sneaky" not in plugins.registry.components["loss"]
    assert_builtins_work(plugins)


def test_the_plugins_command_lists_parts_with_their_kind() -> None:
    from click.testing import CliRunner

    from aligntk.cli import main

    listing = CliRunner().invoke(main, ["plugins"]).output
    assert "    part      kl: k3" in listing and "    part      advantage: gae" in listing
