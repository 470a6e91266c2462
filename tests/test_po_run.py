"""Two-step end-to-end runs of the preference components through the engine."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
from aligntk_po import DPOLoss
from helpers import assert_same_weights

from aligntk import hookimpl
from aligntk.testing import read_metrics, run_recipe, write_tiny_assets

PLUGINS: dict[str, object] = {}  # aligntk_po is installed through its entry point


def preference_recipe(folder: Path, rows: int = 32) -> dict[str, Any]:
    """The tiny SFT recipe with its data swapped for sums whose wrong answer is rejected."""
    recipe = write_tiny_assets(folder)
    rng = random.Random(0)
    for name, n in (("prefs.jsonl", rows), ("prefs_eval.jsonl", 8)):
        with (folder / name).open("w") as f:
            for _ in range(n):
                a, b = rng.randrange(50), rng.randrange(50)
                wrong = a + b + rng.choice([-2, -1, 1, 2])
                f.write(json.dumps({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(wrong)}) + "\n")
    recipe["data"] = {
        "name": "preference",
        "path": str(folder / "prefs.jsonl"),
        "eval_path": str(folder / "prefs_eval.jsonl"),
        "max_length": 16,
    }
    return recipe


@pytest.mark.parametrize("loss", [{"name": "dpo"}, {"name": "dpo", "loss_type": "ipo"}, {"name": "simpo"}])
def test_dpo_family_runs_two_steps(tmp_path: Path, loss: dict[str, Any]) -> None:
    recipe = preference_recipe(tmp_path)
    recipe["loss"] = loss
    recipe["evaluators"] = [{"name": "exact_match", "max_new_tokens": 4}]
    result = run_recipe(recipe, plugins=PLUGINS)
    steps = read_metrics(Path(result.run_dir))
    assert [r["step"] for r in steps] == [1, 2]
    for record in steps:
        assert math.isfinite(record["loss"])
        assert 0.0 <= record["rewards/accuracy"] <= 1.0
        assert "rewards/margin" in record
    if loss == {"name": "dpo"}:
        # The reference is the policy as it starts, so the first step's loss is log 2.
        assert steps[0]["loss"] == pytest.approx(math.log(2), rel=1e-4)
    evals = read_metrics(Path(result.run_dir), split="eval")
    assert evals and all("exact_match" in r and "eval_loss" in r for r in evals)


def test_reward_model_runs_two_steps(tmp_path: Path) -> None:
    recipe = preference_recipe(tmp_path)
    recipe["model"]["task"] = "sequence_classification"
    recipe["model"]["config"]["num_labels"] = 1
    recipe["loss"] = {"name": "reward_model"}
    result = run_recipe(recipe, plugins=PLUGINS)
    steps = read_metrics(Path(result.run_dir))
    assert [r["step"] for r in steps] == [1, 2]
    assert all(math.isfinite(r["loss"]) and 0.0 <= r["accuracy"] <= 1.0 for r in steps)
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(Path(result.run_dir) / "model")
    assert model.config.num_labels == 1


def test_dpo_needs_preference_fields(tmp_path: Path) -> None:
    from aligntk.errors import AligntkError

    recipe = write_tiny_assets(tmp_path)
    recipe["loss"] = {"name": "dpo"}
    with pytest.raises(AligntkError, match="chosen_input_ids"):
        run_recipe(recipe, plugins=PLUGINS)


@pytest.mark.parametrize("name", ["dpo.yaml", "reward_model.yaml"])
def test_shipped_recipes_validate(name: str) -> None:
    from aligntk import load_plugins
    from aligntk.recipe import read_recipe, validate_recipe

    path = Path(__file__).resolve().parents[1] / "recipes" / name
    resolved = validate_recipe(read_recipe(path), load_plugins(extra=PLUGINS).registry, source=path)
    assert resolved.data.name == "preference"


class CountingDPO(DPOLoss):
    """DPO that counts the rows its reference model scores."""

    reference_rows = 0
    live_calls = 0

    def reference_logps(self, models: Any, batch: dict) -> dict:
        CountingDPO.reference_rows += batch["chosen_input_ids"].shape[0]
        return super().reference_logps(models, batch)

    def __call__(self, models: Any, batch: dict) -> Any:
        if "ref_chosen_logps" not in batch:
            CountingDPO.live_calls += 1
        return super().__call__(models, batch)


class CountingPlugin:
    @hookimpl
    def aligntk_register_losses(self, register: Any) -> None:
        register("counting_dpo", CountingDPO)


def test_cached_reference_runs_once_per_example_and_trains_like_live(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    recipe = preference_recipe(tmp_path, rows=16)  # 16 train + 8 eval pairs
    recipe["loss"] = {"name": "counting_dpo"}
    # 12 steps of 4 pairs = 3 epochs, with two evaluations.
    common = ["train.max_steps=12", "train.eval_every=6"]
    CountingDPO.reference_rows = CountingDPO.live_calls = 0
    with caplog.at_level("INFO", logger="aligntk"):
        cached = run_recipe(recipe, [*common, f"output_dir={tmp_path / 'cached'}"], plugins={"c": CountingPlugin()})
    assert "released the frozen 'reference' model" in caplog.text  # its outputs are cached: memory back
    assert CountingDPO.reference_rows == 16 + 8
    assert CountingDPO.live_calls == 0
    assert sorted(p.name for p in (cached.run_dir / "cache").iterdir()) == [
        "counting_dpo-eval.safetensors",
        "counting_dpo-train.safetensors",
    ]
    with caplog.at_level("INFO", logger="aligntk"):
        live = run_recipe(
            {**recipe, "loss": {"name": "counting_dpo", "reference": "live"}},
            [*common, f"output_dir={tmp_path / 'live'}"],
            plugins={"c": CountingPlugin()},
        )
    assert CountingDPO.live_calls > 12  # every training micro-batch and every eval batch
    assert caplog.text.count("released the frozen") == 1  # the live reference stays
    assert_same_weights(cached.run_dir, live.run_dir, atol=1e-4)
    for x, y in zip(read_metrics(cached.run_dir), read_metrics(live.run_dir)):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-6)
