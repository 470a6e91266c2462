"""The engine: exact accumulation, exact resume, precision, the NaN guard, the run folder."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_same_weights, weights
from safetensors.torch import load_file

from aligntk import AligntkError, LossCapabilities, PluginError, TrainingError, hookimpl
from aligntk.engine import global_batch_indices
from aligntk.testing import InterruptAt, read_metrics, run_recipe


def test_global_batches_cover_every_example_once_per_epoch() -> None:
    n, size = 10, 4
    stream = [i for step in range(5) for i in global_batch_indices(step, n, size, seed=3)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]  # a fresh order each epoch
    assert global_batch_indices(2, n, size, seed=3) == stream[8:12]


def test_accumulation_equals_one_large_batch(tiny: dict[str, Any], tmp_path: Path) -> None:
    # The tiny data has prompts of 4 to 6 characters, so micro-batches differ in length
    # and in how many output tokens they hold: a per-micro-batch mean would differ.
    big = run_recipe(tiny, ["train.max_steps=1", "train.batch_size=8", f"output_dir={tmp_path / 'big'}"])
    small = run_recipe(
        tiny,
        ["train.max_steps=1", "train.batch_size=2", "train.grad_accum=4", f"output_dir={tmp_path / 'small'}"],
    )
    (b,), (s,) = read_metrics(big.run_dir), read_metrics(small.run_dir)
    assert math.isclose(b["loss"], s["loss"], rel_tol=1e-6)
    # The gradient norm (before clipping) is that of the global gradient.
    assert math.isclose(b["grad_norm"], s["grad_norm"], rel_tol=1e-5)
    assert b["tokens"] == s["tokens"]
    # Adam's first step is lr * g / (|g| + eps): float noise in tiny gradient entries
    # shows at ~1e-6, while per-micro-batch means would move weights by ~lr (3e-3).
    assert_same_weights(big.run_dir, small.run_dir, atol=2e-5)


def test_resume_ends_with_the_same_weights(tiny: dict[str, Any], tmp_path: Path) -> None:
    common = ["train.max_steps=8", "train.save_every=3", "train.grad_accum=2", "update.warmup_steps=2"]
    full = run_recipe(tiny, [*common, f"output_dir={tmp_path / 'full'}"])
    broken = tmp_path / "broken"
    with pytest.raises(KeyboardInterrupt):
        run_recipe(tiny, [*common, f"output_dir={broken}"], plugins={"crash": InterruptAt(5)})
    assert [p.name for p in (broken / "checkpoints").iterdir()] == ["step-00000003"]
    resumed = run_recipe(tiny, [*common, f"output_dir={broken}"], resume=True)
    assert resumed.steps == 8
    assert_same_weights(full.run_dir, resumed.run_dir)
    # The metrics of the resumed steps equal the uninterrupted run's.
    tail = {r["step"]: r["loss"] for r in read_metrics(broken)}
    for r in read_metrics(full.run_dir):
        assert tail[r["step"]] == pytest.approx(r["loss"], rel=1e-6)


def test_bf16_autocast_runs_on_cpu_and_the_loss_falls(tiny: dict[str, Any]) -> None:
    result = run_recipe(tiny, ["train.max_steps=30", "train.precision=bf16", "train.batch_size=8"])
    losses = [r["loss"] for r in read_metrics(result.run_dir)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert result.last_eval["eval_loss"] < result.first_eval["eval_loss"]


def test_fp16_autocast_with_gradient_scaler_runs(tiny: dict[str, Any]) -> None:
    result = run_recipe(tiny, ["train.max_steps=3", "train.precision=fp16"])
    assert all(math.isfinite(r["loss"]) for r in read_metrics(result.run_dir))


def test_gradient_checkpointing_gives_the_same_step(tiny: dict[str, Any], tmp_path: Path) -> None:
    a = run_recipe(tiny, ["train.max_steps=2", f"output_dir={tmp_path / 'a'}"])
    b = run_recipe(tiny, ["train.max_steps=2", "train.gradient_checkpointing=true", f"output_dir={tmp_path / 'b'}"])
    assert_same_weights(a.run_dir, b.run_dir, atol=1e-6)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny: dict[str, Any], tmp_path: Path) -> None:
    from aligntk_sft import SFTLoss

    class DivergingLoss(SFTLoss):
        """The SFT loss until its fifth call, then NaN, as a diverging run would give."""

        calls = 0

        def __call__(self, models: Any, batch: dict) -> Any:
            out = super().__call__(models, batch)
            DivergingLoss.calls += 1
            if DivergingLoss.calls >= 5:
                out.sum = out.sum * float("nan")
            return out

    class Plugin:
        @hookimpl
        def aligntk_register_losses(self, register: Any) -> None:
            register("diverging", DivergingLoss)

    run_dir = tmp_path / "nan"
    recipe = {**tiny, "loss": {"name": "diverging"}, "data": {**tiny["data"], "eval_path": None}}
    with pytest.raises(TrainingError, match=r"step 5: the loss is nan .*step-00000004"):
        run_recipe(recipe, ["train.max_steps=10", "train.save_every=2", f"output_dir={run_dir}"], plugins={"d": Plugin()})
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["step-00000002", "step-00000004"]
    good = load_file(str(run_dir / "checkpoints" / "step-00000004" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in good.values())
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]
    assert not (run_dir / "model").exists()


def test_an_existing_run_is_never_overwritten_silently(tiny: dict[str, Any]) -> None:
    first = run_recipe(tiny, ["train.max_steps=1"])
    before = (first.run_dir / "metrics.jsonl").read_text()
    with pytest.raises(AligntkError, match="already holds a run.*--resume.*--overwrite"):
        run_recipe(tiny, ["train.max_steps=1"])
    assert (first.run_dir / "metrics.jsonl").read_text() == before
    with pytest.raises(AligntkError, match="no complete checkpoint"):
        run_recipe(tiny, ["train.max_steps=1"], resume=True)
    run_recipe(tiny, ["train.max_steps=2"], overwrite=True)
    assert len(read_metrics(first.run_dir)) == 2


def test_run_folder_holds_recipe_plugins_metrics_and_a_loadable_model(tiny: dict[str, Any]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = run_recipe(tiny, ["train.max_steps=2", "train.eval_every=1"])
    d = result.run_dir
    saved = (d / "recipe.yaml").read_text()
    assert "learning_rate: 0.003" in saved and "truncation:" in saved  # defaults filled in
    assert "sft" in json.loads((d / "plugins.json").read_text())
    record = read_metrics(d)[0]
    assert {"loss", "lr", "grad_norm", "tokens", "tokens_per_s", "step_time"} <= record.keys()
    assert [r["step"] for r in read_metrics(d, "eval")] == [0, 1, 2]
    model = AutoModelForCausalLM.from_pretrained(d / "model")
    tokenizer = AutoTokenizer.from_pretrained(d / "model")
    ids = torch.tensor([tokenizer("1+1=")["input_ids"]])
    assert model(input_ids=ids).logits.shape[-1] == len(tokenizer)


def test_a_plugin_can_stop_the_run(tiny: dict[str, Any]) -> None:
    class StopAt3:
        @hookimpl
        def aligntk_on_step_end(self, run: Any, step: int, metrics: dict[str, float]) -> str | None:
            return "enough" if step == 3 else None

    result = run_recipe(tiny, ["train.max_steps=10"], plugins={"stop": StopAt3()})
    assert result.steps == 3 and result.stopped == "enough"
    assert (result.run_dir / "model" / "model.safetensors").exists()


def test_the_reference_role_defaults_to_a_frozen_copy_of_the_policy(tiny: dict[str, Any]) -> None:
    from aligntk import ComponentConfig, LossOutput

    seen: dict[str, Any] = {}

    class DriftLoss:
        """Squared distance of policy logits from the reference's: zero at the start."""

        Config = ComponentConfig
        requires = frozenset({"input_ids", "attention_mask"})
        roles = ("policy", "reference")

        def __init__(self, config: ComponentConfig):
            pass

        def count(self, batch: dict) -> torch.Tensor:
            return batch["attention_mask"].sum()

        def __call__(self, models: Any, batch: dict) -> LossOutput:
            policy = models.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            ref = models["reference"](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            seen.setdefault("ref_requires_grad", ref.requires_grad)
            mask = batch["attention_mask"][..., None]
            return LossOutput(sum=((policy.float() - ref.float()) ** 2 * mask).sum(), count=batch["attention_mask"].sum())

    class Plugin:
        @hookimpl
        def aligntk_register_losses(self, register: Any) -> None:
            register("drift", DriftLoss)

    result = run_recipe({**tiny, "loss": {"name": "drift"}}, ["train.max_steps=1"], plugins={"drift": Plugin()})
    assert seen["ref_requires_grad"] is False
    assert read_metrics(result.run_dir)[0]["loss"] == 0.0


def test_resume_keeps_metrics_and_refuses_a_changed_recipe(tiny: dict[str, Any], tmp_path: Path) -> None:
    common = ["train.max_steps=6", "train.save_every=2", f"output_dir={tmp_path / 'r'}"]
    full = run_recipe(tiny, [*common[:2], f"output_dir={tmp_path / 'full'}"])
    with pytest.raises(KeyboardInterrupt):
        run_recipe(tiny, common, plugins={"crash": InterruptAt(3)})
    with pytest.raises(AligntkError, match=r"recipe that differs from the run's \(update.learning_rate\)"):
        run_recipe(tiny, [*common, "update.learning_rate=0.1"], resume=True)
    resumed = run_recipe(tiny, common, resume=True)
    records = read_metrics(resumed.run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # step 3 ran twice, logged once
    assert [r["tokens_seen"] for r in records] == [r["tokens_seen"] for r in read_metrics(full.run_dir)]


def test_logged_learning_rate_is_the_one_the_step_used(tiny: dict[str, Any]) -> None:
    result = run_recipe(tiny, ["train.max_steps=4", "update.warmup_steps=2", "update.schedule=constant"])
    assert [r["lr"] for r in read_metrics(result.run_dir)] == pytest.approx([0.0, 1.5e-3, 3e-3, 3e-3])


def test_evaluators_need_evaluation_examples(tiny: dict[str, Any]) -> None:
    recipe = {**tiny, "data": {**tiny["data"], "eval_path": None}, "evaluators": [{"name": "exact_match"}]}
    with pytest.raises(AligntkError, match="evaluators: there are no evaluation examples"):
        run_recipe(recipe)
    assert not Path(tiny["output_dir"]).exists()


def test_losses_with_a_schedule_hear_each_step(tiny: dict[str, Any]) -> None:
    from aligntk_sft import SFTLoss

    seen: list[tuple[int, int]] = []

    class Scheduled(SFTLoss):
        @classmethod
        def capabilities(cls, config: Any) -> LossCapabilities:
            return LossCapabilities(scheduled=True)

        def start_step(self, step: int, max_steps: int) -> None:
            seen.append((step, max_steps))

    class Plugin:
        @hookimpl
        def aligntk_register_losses(self, register: Any) -> None:
            register("scheduled", Scheduled)

    run_recipe({**tiny, "loss": {"name": "scheduled"}}, ["train.max_steps=3"], plugins={"s": Plugin()})
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_whole_batch_losses_refuse_accumulation(tiny: dict[str, Any]) -> None:
    from aligntk_sft import SFTLoss

    class WholeBatch(SFTLoss):
        @classmethod
        def capabilities(cls, config: Any) -> LossCapabilities:
            return LossCapabilities(whole_batch=True)

    class Plugin:
        @hookimpl
        def aligntk_register_losses(self, register: Any) -> None:
            register("whole", WholeBatch)

    recipe = {**tiny, "loss": {"name": "whole"}}
    with pytest.raises(AligntkError, match="loss 'whole' computes statistics over the whole batch"):
        run_recipe(recipe, ["train.grad_accum=2"], plugins={"w": Plugin()})
    assert run_recipe(recipe, ["train.max_steps=1"], plugins={"w": Plugin()}, overwrite=True).steps == 1


def test_optional_members_must_be_declared(tiny: dict[str, Any]) -> None:
    # A loss with start_step but no capabilities() would have its schedule ignored: refused instead.
    from aligntk_sft import SFTLoss

    from aligntk.recipe import validate_recipe

    class Undeclared(SFTLoss):
        def start_step(self, step: int, max_steps: int) -> None: ...

    class Promises(SFTLoss):
        @classmethod
        def capabilities(cls, config: Any) -> LossCapabilities:
            return LossCapabilities(precompute=True)

    class Plugin:
        @hookimpl
        def aligntk_register_losses(self, register: Any) -> None:
            register("undeclared", Undeclared)
            register("promises", Promises)

    from aligntk import load_plugins

    registry = load_plugins(extra={"p": Plugin()}).registry
    with pytest.raises(PluginError, match=r"loss 'undeclared' \(.*Undeclared\) has start_step but declares no "
                                          r"capabilities\(config\); return a LossCapabilities"):
        validate_recipe({**tiny, "loss": {"name": "undeclared"}}, registry)
    with pytest.raises(PluginError, match=r"loss 'promises' declares precompute but defines no precompute\(\)"):
        validate_recipe({**tiny, "loss": {"name": "promises"}}, registry)


def test_same_seed_same_weights_other_seed_other_weights(tiny: dict[str, Any], tmp_path: Path) -> None:
    a = run_recipe(tiny, ["train.max_steps=2", f"output_dir={tmp_path / 'a'}"])
    b = run_recipe(tiny, ["train.max_steps=2", f"output_dir={tmp_path / 'b'}"])
    c = run_recipe(tiny, ["train.max_steps=2", "seed=1", f"output_dir={tmp_path / 'c'}"])
    assert_same_weights(a.run_dir, b.run_dir)
    assert not torch.equal(weights(a.run_dir)["lm_head.weight"], weights(c.run_dir)["lm_head.weight"])


def test_a_saved_model_folder_is_a_starting_point(tiny: dict[str, Any], tmp_path: Path) -> None:
    first = run_recipe(tiny, ["train.max_steps=3", f"output_dir={tmp_path / 'first'}"])
    # Continue from the saved folder: model and tokenizer both come from it.
    recipe = {**tiny, "model": {"path": str(first.run_dir / "model")}}
    second = run_recipe(recipe, ["train.max_steps=1", f"output_dir={tmp_path / 'second'}"])
    assert second.first_eval["eval_loss"] == pytest.approx(first.last_eval["eval_loss"], rel=1e-5)


def test_tokens_per_s_is_over_a_window_and_wall_time_grows(tiny: dict[str, Any]) -> None:
    from aligntk.engine import THROUGHPUT_WINDOW

    result = run_recipe(tiny, [f"train.max_steps={THROUGHPUT_WINDOW + 5}"])
    records = read_metrics(result.run_dir)
    for i, r in enumerate(records):
        window = records[max(0, i + 1 - THROUGHPUT_WINDOW) : i + 1]
        expected = sum(w["tokens"] for w in window) / sum(w["step_time"] for w in window)
        assert r["tokens_per_s"] == pytest.approx(expected, rel=1e-9)
    walls = [r["wall_time"] for r in records]
    assert walls == sorted(walls) and walls[0] > 0
    assert result.wall_time >= walls[-1]
