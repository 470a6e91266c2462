"""Recipes: every mistake gives one clear line naming the key path, before any model loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from aligntk import RecipeError, load_plugins
from aligntk.recipe import apply_override, read_recipe, validate_recipe


@pytest.fixture(scope="module")
def registry() -> Any:
    return load_plugins().registry


def write(tmp_path: Path, recipe: dict[str, Any] | str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
    return path


def error(recipe: dict[str, Any], registry: Any, overrides: tuple[str, ...] = ()) -> str:
    raw = dict(recipe)
    for o in overrides:
        apply_override(raw, o)
    with pytest.raises(RecipeError) as info:
        validate_recipe(raw, registry)
    return str(info.value)


def test_a_valid_recipe_resolves_with_defaults(tiny: dict[str, Any], registry: Any) -> None:
    resolved = validate_recipe(tiny, registry)
    assert resolved.data.config.truncation == "right"
    assert resolved.update.config.learning_rate == 3e-3
    assert resolved.roles() == ("policy",)
    dumped = resolved.dump()
    assert dumped["loss"] == [{"name": "sft", "chunk_size": "auto", "weight": 1.0}]
    assert validate_recipe(dumped, registry).dump() == dumped  # the saved recipe runs as is


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lerning_rate=1", "train.lerning_rate: unknown key (allowed: max_steps, batch_size"),
        ("train.max_stepz=1", "train.max_stepz: unknown key, did you mean 'max_steps'?"),
        ("update.lerning_rate=1", "update.lerning_rate: unknown key, did you mean 'learning_rate'?"),
        ("data.max_lenght=5", "data.max_lenght: unknown key, did you mean 'max_length'?"),
        ("model.tokeniser=x", "model.tokeniser: unknown key, did you mean 'tokenizer'?"),
        ("trian={}", "trian: unknown key, did you mean 'train'?"),
        ("train.max_steps=ten", "train.max_steps: Input should be a valid integer"),
        ("train.max_steps=0", "train.max_steps: Input should be greater than 0, got 0"),
        ("train.precision=fp8", "train.precision: Input should be 'fp32', 'bf16' or 'fp16', got 'fp8'"),
        ("update.learning_rate=-1", "update.learning_rate: Input should be greater than 0, got -1"),
        ("data.truncation=middle", "data.truncation: Input should be"),
        ("loss.name=sfd", "loss.name: unknown loss 'sfd', did you mean 'sft'?"),
        ("update.name=fulll", "update.name: unknown update 'fulll', did you mean 'full'?"),
        ("models.policy={path: x}", "the policy is 'model'"),
    ],
)
def test_mistakes_name_the_key_path(tiny: dict[str, Any], registry: Any, override: str, message: str) -> None:
    assert message in error(tiny, registry, (override,))


def test_the_issue_example_message(tiny: dict[str, Any], registry: Any) -> None:
    from aligntk.recipe import TrainSpec

    raw = {**tiny, "train": {**tiny["train"], "lerning_rate": 1}}
    # learning_rate lives in the update step; the train section suggests its closest key.
    assert "train.lerning_rate: unknown key" in error(raw, registry)
    assert "learning_rate" in error({**tiny, "update": {"name": "full", "lerning_rate": 1}}, registry)
    assert "max_steps" in TrainSpec.model_fields


def test_missing_keys_and_sources(tiny: dict[str, Any], registry: Any) -> None:
    no_train = {k: v for k, v in tiny.items() if k != "train"}
    assert "train: required key is missing" in error(no_train, registry)
    both = {**tiny, "model": {**tiny["model"], "path": "somewhere"}}
    assert "model: give exactly one of 'path'" in error(both, registry)
    no_type = {**tiny, "model": {"config": {"hidden_size": 8}, "tokenizer": "t"}}
    assert "model: 'config' needs a 'model_type'" in error(no_type, registry)


def test_data_must_provide_what_the_loss_reads(tiny: dict[str, Any], registry: Any) -> None:
    from aligntk import ComponentConfig
    from aligntk.registry import Registry

    class RewardsOnly:
        Config = ComponentConfig
        provides = frozenset({"input_ids"})

    reg = Registry()
    reg.components = {k: dict(v) for k, v in registry.components.items()}
    reg.add("data", "ids_only", RewardsOnly, "test")
    message = error({**tiny, "data": {"name": "ids_only"}}, reg)
    assert "loss 'sft' needs batch fields ['labels'] that data 'ids_only' does not provide" in message


def test_paths_resolve_relative_to_the_recipe_file(tmp_path: Path, registry: Any, tiny: dict[str, Any]) -> None:
    recipe = {**tiny, "data": {"name": "sft", "path": "data/train.jsonl"}}
    path = write(tmp_path, recipe)
    with pytest.raises(RecipeError, match=r"r\.yaml: data\.path: file not found: .*data/train\.jsonl"):
        validate_recipe(read_recipe(path), registry, source=path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("")
    resolved = validate_recipe(read_recipe(path), registry, source=path)
    assert resolved.data.config.path == tmp_path / "data" / "train.jsonl"


def test_yaml_errors_name_file_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  max_steps: 3\n bad: [1, 2\n")
    with pytest.raises(RecipeError, match=r"r\.yaml:3:\d+: not valid YAML"):
        read_recipe(path)
    with pytest.raises(RecipeError, match="recipe file not found"):
        read_recipe(tmp_path / "missing.yaml")
    with pytest.raises(RecipeError, match="a recipe is a mapping of keys, got list"):
        read_recipe(write(tmp_path, "- 1\n- 2\n"))


def test_yaml_is_read_safely(tmp_path: Path) -> None:
    path = write(tmp_path, "seed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        read_recipe(path)


def test_overrides_parse_values_as_yaml_and_create_keys() -> None:
    raw: dict[str, Any] = {"train": {"max_steps": 1}, "loss": [{"name": "a"}, {"name": "b"}]}
    apply_override(raw, "train.max_steps=50")
    apply_override(raw, "train.precision=bf16")
    apply_override(raw, "loss.1.weight=0.5")
    apply_override(raw, "model.config.hidden_size=32")
    assert raw["train"] == {"max_steps": 50, "precision": "bf16"}
    assert raw["loss"][1] == {"name": "b", "weight": 0.5}
    assert raw["model"] == {"config": {"hidden_size": 32}}
    with pytest.raises(RecipeError, match="expected key.path=value"):
        apply_override(raw, "train.max_steps")
    with pytest.raises(RecipeError, match="no list item 7"):
        apply_override(raw, "loss.7.weight=1")


def test_several_losses_with_weights(tiny: dict[str, Any], registry: Any) -> None:
    resolved = validate_recipe({**tiny, "loss": [{"name": "sft"}, {"name": "sft", "weight": 0.1}]}, registry)
    assert [c.weight for c in resolved.losses] == [1.0, 0.1]
    assert "loss.1.weight: Input should be a valid number" in error(
        {**tiny, "loss": [{"name": "sft"}, {"name": "sft", "weight": "x"}]}, registry
    )
