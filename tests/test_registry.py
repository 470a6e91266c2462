"""aligntk.registry and aligntk.parts on their own: add and get, duplicates, unknown names, part options."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import PositiveInt, ValidationError

from aligntk import ComponentConfig, PluginError, RecipeError, hookimpl, load_plugins
from aligntk.errors import DuplicateComponentError
from aligntk.parts import Part, part
from aligntk.registry import Registered, Registry


class WidgetConfig(ComponentConfig):
    size: PositiveInt = 1


class Small:
    Config = WidgetConfig

    def __init__(self, config: WidgetConfig):
        self.config = config


class Big(Small):
    pass


class NoConfig:
    pass


def _registry() -> Registry:
    registry = Registry()
    registry.add("loss", "sft", Small, "one")
    registry.add("loss", "dpo", Big, "two")
    registry.add_part("widget", "small", Small, "one")
    registry.add_part("widget", "big", Big, "two")
    return registry


# --------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------


def test_add_then_get_returns_the_class_and_its_plugin() -> None:
    registry = _registry()
    assert registry.get("loss", "sft", "loss.name") == Registered("loss", "sft", Small, "one")
    assert registry.get("widget", "big", "loss.widget") == Registered("widget", "big", Big, "two", part=True)
    assert registry.by_plugin("two") == [
        Registered("loss", "dpo", Big, "two"),
        Registered("widget", "big", Big, "two", part=True),
    ]
    assert registry.part_kinds() == ["widget"]


def test_a_name_registered_twice_is_an_error_naming_both_plugins() -> None:
    registry = _registry()
    with pytest.raises(DuplicateComponentError) as info:
        registry.add("loss", "sft", Big, "three")
    assert str(info.value) == (
        "loss 'sft' is registered twice: by plugin 'one' and by plugin 'three'; "
        "uninstall one of them or rename its component"
    )
    with pytest.raises(DuplicateComponentError) as info:
        registry.add_part("widget", "big", Small, "one")
    assert str(info.value).startswith("widget 'big' is registered twice: by plugin 'two' and by plugin 'one'")
    registry.add("data", "sft", Small, "three")  # names are per kind
    assert registry.get("loss", "sft", "loss.name").plugin == "one"


def test_bad_registrations_name_the_plugin() -> None:
    registry = Registry()
    with pytest.raises(PluginError, match=r"^plugin 'p' registered a loss with an invalid name ''$"):
        registry.add("loss", "", Small, "p")
    with pytest.raises(PluginError) as info:
        registry.add("loss", "x", NoConfig, "p")
    assert str(info.value) == f"plugin 'p': loss 'x' ({NoConfig!r}) has no Config options model"
    with pytest.raises(PluginError, match=r"^plugin 'p' registered part 'k' of kind 'loss', which is a component kind"):
        registry.add_part("loss", "k", Small, "p")


def test_an_unknown_name_suggests_the_closest_and_lists_the_installed() -> None:
    registry = _registry()
    with pytest.raises(RecipeError) as info:
        registry.get("loss", "sfft", "loss.name")
    assert str(info.value) == "loss.name: unknown loss 'sfft', did you mean 'sft'? (installed: dpo, sft)"
    assert registry.unknown("loss", "zzz") == "unknown loss 'zzz' (installed: dpo, sft)"
    assert registry.unknown("reward", "x") == "unknown reward 'x' (installed: none)"
    assert registry.unknown("widgte", "big") == (
        "unknown widgte 'big': no installed plugin registers parts of kind 'widgte', did you mean kind 'widget'? "
        "(part kinds: widget)"
    )


class _Losses:
    def __init__(self, name: str):
        self.name = name

    @hookimpl
    def aligntk_register_losses(self, register: Any) -> None:
        register(self.name, Small)


def test_two_plugins_registering_one_name_stop_the_load_naming_both() -> None:
    with pytest.raises(DuplicateComponentError) as info:
        load_plugins(extra={"first": _Losses("twin"), "second": _Losses("twin")})
    assert str(info.value).startswith("loss 'twin' is registered twice: by plugin 'first' and by plugin 'second'")
    registry = load_plugins(extra={"first": _Losses("twin")}).registry
    assert registry.get("loss", "twin", "loss.name") == Registered("loss", "twin", Small, "first")


# --------------------------------------------------------------------------------------
# Parts: an option that names a registered part
# --------------------------------------------------------------------------------------


class HolderConfig(ComponentConfig):
    widget: part("widget") = "small"


def _holder(value: Any = None) -> HolderConfig:
    data = {} if value is None else {"widget": value}
    return HolderConfig.model_validate(data, context={"registry": _registry()})


def test_a_part_by_name_and_by_default() -> None:
    assert _holder().widget == Part("widget", "small", Small, WidgetConfig())
    chosen = _holder("big").widget
    assert (chosen.kind, chosen.name, chosen.cls, chosen.config) == ("widget", "big", Big, WidgetConfig())


def test_a_part_by_mapping_with_options_builds_and_dumps() -> None:
    config = _holder({"name": "big", "size": 3})
    assert config.widget.config == WidgetConfig(size=3)
    built = config.widget.build()
    assert isinstance(built, Big) and built.config.size == 3
    assert config.model_dump() == {"widget": {"name": "big", "size": 3}}  # what the run folder's recipe records


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("bigg", "unknown widget 'bigg', did you mean 'big'? (installed: big, small)"),
        ({"name": "big", "size": 0}, "widget 'big': size: Input should be greater than 0, got 0"),
        ({"name": "big", "colour": "red"}, "widget 'big': colour: unknown key (allowed: size)"),
        (3, "expected the name of a widget component, or a mapping with 'name' and its options"),
        ({"size": 3}, "expected the name of a widget component, or a mapping with 'name' and its options"),
    ],
)
def test_a_bad_part_is_an_error_on_its_option(value: Any, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        _holder(value)
    (error,) = info.value.errors()
    assert error["loc"] == ("widget",)
    assert error["msg"] == f"Value error, {message}"
