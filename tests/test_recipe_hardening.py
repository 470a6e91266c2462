"""Recipe and model mistakes that once passed silently or ended in a traceback: one line each."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner

from aligntk import AligntkError, RecipeError, load_plugins
from aligntk.cli import main
from aligntk.models import build_model, check_resources, load_tokenizer, save_pretrained
from aligntk.recipe import ModelSpec, apply_override, read_recipe, validate_recipe
from aligntk.testing import TINY_LLAMA, char_tokenizer

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


@pytest.fixture(scope="module")
def registry() -> Any:
    return load_plugins().registry


def write(tmp_path: Path, recipe: dict[str, Any] | str | bytes, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    if isinstance(recipe, bytes):
        path.write_bytes(recipe)
    else:
        path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
    return path


def validate_file(path: Path, registry: Any, overrides: tuple[str, ...] = ()) -> Any:
    return validate_recipe(read_recipe(path, overrides), registry, source=path)


def cli_error(args: list[str]) -> str:
    """The one ``error:`` line of a command that must fail with exit status 1 and no traceback."""
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


# -- 1. duplicate YAML keys -------------------------------------------------------------------


def test_a_duplicate_key_names_file_line_and_key_path(tmp_path: Path) -> None:
    path = write(tmp_path, "seed: 0\ntrain:\n  max_steps: 3\n  batch_size: 4\n  max_steps: 50\n")
    with pytest.raises(RecipeError) as info:
        read_recipe(path)
    assert str(info.value) == (
        f"{path}:5:3: train.max_steps: duplicate key (first on line 3); give each key once"
    )


def test_a_duplicate_section_and_a_duplicate_inside_a_list(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"r\.yaml:3:1: train: duplicate key \(first on line 1\)"):
        read_recipe(write(tmp_path, "train: {max_steps: 1}\nseed: 0\ntrain: {max_steps: 2}\n"))
    text = "loss:\n  - name: sft\n  - name: sft\n    weight: 1\n    weight: 2\n"
    with pytest.raises(RecipeError, match=r"r\.yaml:5:5: loss\.1\.weight: duplicate key \(first on line 4\)"):
        read_recipe(write(tmp_path, text))


def test_merge_keys_may_still_be_overridden_and_loading_stays_safe(tmp_path: Path) -> None:
    text = "base: &b {max_steps: 1, batch_size: 4}\ntrain:\n  <<: *b\n  max_steps: 3\n"
    assert read_recipe(write(tmp_path, text))["train"] == {"max_steps": 3, "batch_size": 4}
    with pytest.raises(RecipeError, match="not valid YAML"):
        read_recipe(write(tmp_path, "seed: !!python/object/apply:os.system ['echo pwned']\n"))
    with pytest.raises(RecipeError, match="override 'train={a: 1, a: 2}': the value gives the key 'a' twice"):
        apply_override({}, "train={a: 1, a: 2}")


# -- 2. model.config keys, checked against transformers' config class ---------------------------


def test_an_unknown_config_key_suggests_the_close_one(tmp_path: Path, tiny: dict[str, Any], registry: Any) -> None:
    tiny["model"]["config"]["hiden_size"] = 64
    path = write(tmp_path, tiny)
    line = path.read_text().splitlines().index("    hiden_size: 64") + 1
    with pytest.raises(RecipeError) as info:
        validate_file(path, registry)
    assert str(info.value) == (
        f"{path}:{line}: model.config.hiden_size: unknown key for a llama config, did you mean 'hidden_size'?"
    )


def test_config_keys_of_frozen_roles_and_from_overrides(tmp_path: Path, tiny: dict[str, Any], registry: Any) -> None:
    tiny["models"] = {"reference": {"config": {**TINY_LLAMA, "num_hiden_layers": 1}, "tokenizer": "t"}}
    path = write(tmp_path, tiny)
    with pytest.raises(RecipeError, match=r"r\.yaml:\d+: models\.reference\.config\.num_hiden_layers: unknown key "
                       r"for a llama config, did you mean 'num_hidden_layers'\?"):
        validate_file(path, registry)
    # A key an override added has no line in the file: the message names the file only.
    del tiny["models"]
    path = write(tmp_path, tiny)
    with pytest.raises(RecipeError) as info:
        validate_file(path, registry, ("model.config.rms_norm_epz=1.0e-5",))
    assert str(info.value) == (
        f"{path}: model.config.rms_norm_epz: unknown key for a llama config, did you mean 'rms_norm_eps'?"
    )


def test_an_unknown_model_type(tmp_path: Path, tiny: dict[str, Any], registry: Any) -> None:
    tiny["model"]["config"]["model_type"] = "lama"
    path = write(tmp_path, tiny)
    with pytest.raises(RecipeError, match=r"r\.yaml:\d+: model\.config\.model_type: unknown model type 'lama', "
                       r"did you mean 'llama'\?"):
        validate_file(path, registry)


def test_an_impossible_architecture_fails_at_validate(tmp_path: Path, tiny: dict[str, Any], registry: Any) -> None:
    tiny["model"]["config"].update(hidden_size=32, num_attention_heads=3)
    with pytest.raises(RecipeError) as info:
        validate_file(write(tmp_path, tiny), registry)
    assert "model.config: not a valid llama config: The hidden size (32) is not a multiple of the number of " \
        "attention heads (3)." in str(info.value)


def test_common_config_keys_are_known(tmp_path: Path, tiny: dict[str, Any], registry: Any) -> None:
    # Keys every config takes (not only llama's own), an alias (gpt2's hidden_size is n_embd) and the quickstart's.
    tiny["model"]["config"].update(tie_word_embeddings=True, rope_theta=10000.0, num_labels=2, use_cache=False)
    validate_file(write(tmp_path, tiny), registry)
    gpt2 = {"model_type": "gpt2", "hidden_size": 32, "n_layer": 1, "num_attention_heads": 2}
    validate_file(write(tmp_path, {**tiny, "model": {**tiny["model"], "config": gpt2}}), registry)
    assert validate_file(QUICKSTART, registry).recipe.model.config["hidden_size"] == 128


# -- 3. a bool where a number is wanted -----------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.max_steps=true", "train.max_steps: expected an integer, got True"),
        ("train.eval_every=false", "train.eval_every: expected an integer, got False"),
        ("seed=true", "seed: expected an integer, got True"),
        ("loss.weight=true", "loss.weight: expected a number, got True"),
        ("update.learning_rate=true", "update.learning_rate: expected a number, got True"),
        ("update.betas=[0.9, true]", "update.betas: expected a number at item 1, got True"),
        ("data.max_length=true", "data.max_length: expected an integer, got True"),
    ],
)
def test_a_bool_is_not_a_number(tiny: dict[str, Any], registry: Any, override: str, message: str) -> None:
    apply_override(tiny, override)
    with pytest.raises(RecipeError) as info:
        validate_recipe(tiny, registry)
    assert str(info.value) == message


def test_bools_and_numbers_still_pass_where_they_belong(tiny: dict[str, Any], registry: Any) -> None:
    for override in ("train.compile=true", "update.learning_rate=1", "train.gradient_checkpointing=false"):
        apply_override(tiny, override)
    resolved = validate_recipe(tiny, registry)
    assert resolved.train.compile is True and resolved.train.gradient_checkpointing is False
    assert resolved.update.config.learning_rate == 1.0 and isinstance(resolved.update.config.learning_rate, float)
    with pytest.raises(ValueError, match="expected a number"):  # assignment is checked too
        resolved.update.config.learning_rate = True


def test_model_spec_refuses_a_bool_for_num_labels(tiny: dict[str, Any], registry: Any) -> None:
    apply_override(tiny, "model.num_labels=true")
    with pytest.raises(RecipeError, match="model.num_labels: expected an integer, got True"):
        validate_recipe(tiny, registry)


# -- 4. overrides start from a section's default ------------------------------------------------


def test_an_override_on_a_missing_section_starts_from_its_default(
    tmp_path: Path, tiny: dict[str, Any], registry: Any
) -> None:
    del tiny["update"]
    path = write(tmp_path, tiny)
    for text in ("1.0e-4", "1e-4"):  # the README's own example (YAML 1.1 reads 1e-4 as text; pydantic as a float)
        resolved = validate_file(path, registry, (f"update.learning_rate={text}",))
        assert resolved.update.name == "full"
        assert resolved.update.config.learning_rate == 1e-4
    assert read_recipe(path, ("update.learning_rate=0.5",))["update"] == {"name": "full", "learning_rate": 0.5}
    # The section named by the override wins over the default; a section without a default starts empty.
    assert read_recipe(path, ("update.name=lora", "update.rank=4"))["update"] == {"name": "lora", "rank": 4}
    assert read_recipe(path, ("models.teacher.path=x",))["models"] == {"teacher": {"path": "x"}}


def test_override_defaults_come_from_the_schema_given() -> None:
    from pydantic import BaseModel

    class Budget(BaseModel):
        max_steps: int = 10
        seconds: int | None = None

    class Suite(BaseModel):
        budget: Budget = Budget(max_steps=20)

    raw: dict[str, Any] = {}
    apply_override(raw, "budget.seconds=5", defaults=Suite)
    assert raw == {"budget": {"max_steps": 20, "seconds": 5}}


# -- 5. a recipe that is not UTF-8 --------------------------------------------------------------


def test_a_file_that_is_not_utf8_names_line_and_byte_offset(tmp_path: Path) -> None:
    data = "seed: 0\ntrain:\n  max_steps: 3  # caf\u00e9\n".encode("latin-1")
    path = write(tmp_path, data)
    offset = data.index(b"\xe9")
    with pytest.raises(RecipeError) as info:
        read_recipe(path)
    assert str(info.value) == (
        f"{path}:3: not UTF-8 text (byte 0xe9 at byte offset {offset}); save the recipe as UTF-8"
    )
    assert "Traceback" not in cli_error(["validate", str(path)])


# -- 6. validate checks folders and the device --------------------------------------------------


def test_validate_finds_a_missing_tokenizer_folder(tmp_path: Path, tiny: dict[str, Any]) -> None:
    tiny["model"]["tokenizer"] = "./no/such/tokenizer"
    line = cli_error(["validate", str(write(tmp_path, tiny))])
    assert line == (
        f"error: {tmp_path / 'r.yaml'}: model.tokenizer: ./no/such/tokenizer: no such model or tokenizer folder "
        f"(looked in {tmp_path / 'no/such/tokenizer'})"
    )


def test_validate_finds_a_missing_model_folder_but_not_a_hub_id(
    tmp_path: Path, tiny: dict[str, Any], registry: Any
) -> None:
    tokenizer = tiny["model"]["tokenizer"]
    tiny["model"] = {"path": "../models/gone", "tokenizer": tokenizer}
    path = write(tmp_path, tiny)
    with pytest.raises(AligntkError, match=r"r\.yaml: model\.path: \.\./models/gone: no such model or tokenizer"):
        check_resources(validate_file(path, registry))
    tiny["model"] = {"path": "some-org/some-model", "tokenizer": tokenizer}  # a hub id: not looked up
    check_resources(validate_file(write(tmp_path, tiny), registry))
    tiny["models"] = {"teacher": {"path": "/no/such/teacher"}}
    with pytest.raises(AligntkError, match=r"models\.teacher\.path: /no/such/teacher: no such model"):
        check_resources(validate_file(write(tmp_path, tiny), registry))


def test_validate_finds_a_missing_device(tmp_path: Path, tiny: dict[str, Any]) -> None:
    missing = [d for d, there in (("cuda", torch.cuda.is_available()), ("mps", torch.backends.mps.is_available()))
               if not there]
    if not missing:
        pytest.skip("both cuda and mps are available here")
    line = cli_error(["validate", str(write(tmp_path, tiny)), f"train.device={missing[0]}"])
    assert line.startswith(f"error: {tmp_path / 'r.yaml'}: train.device: {missing[0]} was asked for but")


# -- 7. broken model and tokenizer files --------------------------------------------------------


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, Any]:
    """A tiny saved model folder and its tokenizer."""
    tokenizer = char_tokenizer("0123456789+=")
    spec = ModelSpec(config=dict(TINY_LLAMA), tokenizer="unused")
    folder = tmp_path / "model"
    save_pretrained(build_model(spec, tokenizer, tmp_path), tokenizer, folder)
    return folder, tokenizer


def test_a_truncated_safetensors_file_is_named(saved: tuple[Path, Any], tmp_path: Path, tiny: dict[str, Any]) -> None:
    folder, tokenizer = saved
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(AligntkError) as info:
        build_model(ModelSpec(path=str(folder)), tokenizer, tmp_path)
    assert str(info.value).startswith(f"model.path: cannot build the model: {weights}: corrupt or truncated safetensors")
    recipe = {**tiny, "model": {"path": str(folder)}}
    line = cli_error(["run", str(write(tmp_path, recipe))])
    assert f"{weights}: corrupt or truncated safetensors file" in line


def test_a_bad_pytorch_checkpoint_never_suggests_weights_only_false(saved: tuple[Path, Any], tmp_path: Path) -> None:
    folder, tokenizer = saved
    (folder / "model.safetensors").unlink()
    checkpoint = folder / "pytorch_model.bin"
    torch.save({"model.embed_tokens.weight": datetime.date(2020, 1, 1)}, checkpoint)  # not a plain tensor
    with pytest.raises(AligntkError) as info:
        build_model(ModelSpec(path=str(folder)), tokenizer, tmp_path)
    assert str(info.value).startswith(f"model.path: cannot build the model: {checkpoint}: not a plain tensor")
    assert "weights_only" not in str(info.value).replace("aligntk loads weights only", "")
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    with pytest.raises(AligntkError, match="pytorch_model.bin: corrupt or truncated PyTorch checkpoint"):
        build_model(ModelSpec(path=str(folder)), tokenizer, tmp_path)


def test_an_impossible_architecture_at_build_time(tmp_path: Path) -> None:
    config = {**TINY_LLAMA, "hidden_size": 32, "num_attention_heads": 3}
    with pytest.raises(AligntkError) as info:
        build_model(ModelSpec(config=config, tokenizer="t"), char_tokenizer("0123456789"), tmp_path)
    assert str(info.value) == (
        "model.config: cannot build the model: "
        "The hidden size (32) is not a multiple of the number of attention heads (3)."
    )


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ('{"truncated": ', "tokenizer.json:1:15: not valid JSON: Expecting value"),
        ('{"model": {"type": "Nope"}}', "tokenizer.json: not a tokenizer file: "),
        (json.dumps([1, 2]), "tokenizer.json: not a tokenizer file: "),
    ],
)
def test_a_corrupt_tokenizer_json_is_named(tmp_path: Path, content: str, why: str) -> None:
    folder = tmp_path / "tokenizer"
    char_tokenizer("0123456789+=").save_pretrained(folder)
    (folder / "tokenizer.json").write_text(content)
    with pytest.raises(AligntkError) as info:
        load_tokenizer(ModelSpec(config=dict(TINY_LLAMA), tokenizer=str(folder)), tmp_path)
    message = str(info.value)
    assert message.startswith(f"model.tokenizer: cannot load a tokenizer from {folder}: {folder}/") and why in message
    assert "\n" not in message
