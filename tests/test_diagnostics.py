"""Diagnostics: each rule fires on a run built to trigger it and stays silent on a healthy run;
forgetting evaluators (perplexity on general text, parameter drift)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
import torch
from aligntk_sft.loss import SFTLoss

from aligntk import AligntkError, LossCapabilities, LossOutput, Models, TrainingError, hookimpl, load_plugins
from aligntk.recipe import validate_recipe
from aligntk.hookspecs import Register
from aligntk.testing import char_tokenizer, read_metrics, run_recipe, tiny_model, write_tiny_assets

if importlib.util.find_spec("aligntk_diagnostics") is None:  # not installed yet: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))
import aligntk_diagnostics  # noqa: E402
from aligntk_diagnostics import rules  # noqa: E402
from aligntk_diagnostics.forgetting import GeneralPerplexity, ParameterDrift  # noqa: E402

INSTALLED = any(ep.name == "diagnostics" for ep in entry_points(group="aligntk"))


# -- losses built to break a run ---------------------------------------------------


class MaskedSFT(SFTLoss):
    """SFT with every label masked: the loss is 0 and no gradient flows."""

    def _mask(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {**batch, "labels": torch.full_like(batch["labels"], -100)}

    def count(self, batch: dict[str, Any]) -> torch.Tensor:
        return super().count(self._mask(batch))

    def __call__(self, models: Models, batch: dict[str, Any]) -> LossOutput:
        return super().__call__(models, self._mask(batch))


class ScheduledSFT(SFTLoss):
    """SFT multiplied by ``1e4`` from step 5 on (``explode``), or by NaN at step 3 (``nan``)."""

    mode = "explode"
    step = 0  # evaluation before training

    @classmethod
    def capabilities(cls, config: Any) -> LossCapabilities:
        return LossCapabilities(scheduled=True)

    def start_step(self, step: int, max_steps: int) -> None:
        self.step = step

    def __call__(self, models: Models, batch: dict[str, Any]) -> LossOutput:
        out = super().__call__(models, batch)
        if self.mode == "explode" and self.step >= 5:
            out.sum = out.sum * 1e4
        if self.mode == "nan" and self.step >= 3:
            out.sum = out.sum * float("nan")
        return out


class NaNSFT(ScheduledSFT):
    mode = "nan"


class BrokenLosses:
    @hookimpl
    def aligntk_register_losses(self, register: Register) -> None:
        register("masked_sft", MaskedSFT)
        register("exploding_sft", ScheduledSFT)
        register("nan_sft", NaNSFT)


def _run(recipe: dict[str, Any], overrides: list[str], options: dict[str, Any] | None = None) -> Any:
    recipe = {**recipe, "plugins": {"diagnostics": {"window": 4, **(options or {})}}}
    plugins: dict[str, object] = {"broken_losses": BrokenLosses()}
    if not INSTALLED:
        plugins["diagnostics"] = aligntk_diagnostics
    return run_recipe(recipe, overrides, plugins=plugins)


def _findings(recipe: dict[str, Any]) -> list[dict[str, Any]]:
    path = Path(recipe["output_dir"]) / "diagnostics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _kinds(recipe: dict[str, Any]) -> list[str]:
    return [f["kind"] for f in _findings(recipe)]


# -- whole runs --------------------------------------------------------------------


def test_healthy_run_is_silent(tiny: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    _run(tiny, ["train.max_steps=8"])
    assert _kinds(tiny) == []
    assert not [r for r in caplog.records if "diagnostics" in r.getMessage()]


def test_flat_loss_with_a_tiny_learning_rate(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Every step sees the whole data set, so the loss is flat unless the weights move.
    recipe = write_tiny_assets(tmp_path / "a", rows=16)
    recipe["update"] = {"name": "full", "learning_rate": 1e-12, "schedule": "constant"}
    _run(recipe, ["train.max_steps=6", "train.batch_size=16"])
    assert _kinds(recipe) == ["stalled_learning_rate"]
    finding = _findings(recipe)[0]
    assert finding["step"] == 4 and "learning rate was at most 1e-12" in finding["message"]
    warnings = [r.getMessage() for r in caplog.records if "diagnostics" in r.getMessage()]
    assert len(warnings) == 1 and "flat" in warnings[0]  # said once, not every step


def test_all_labels_masked_gives_a_zero_gradient(tiny: dict[str, Any]) -> None:
    tiny["loss"] = {"name": "masked_sft"}
    _run(tiny, ["train.max_steps=4"])
    assert _kinds(tiny) == ["vanishing_gradient"]
    assert "every label is masked" in _findings(tiny)[0]["message"]


def test_exploding_gradient(tiny: dict[str, Any]) -> None:
    tiny["loss"] = {"name": "exploding_sft"}
    result = _run(tiny, ["train.max_steps=6"])
    assert _kinds(tiny) == ["exploding_gradient"] and _findings(tiny)[0]["step"] == 5
    assert result.stopped is None  # observing only, by default


def test_exploding_gradient_can_stop_the_run(tiny: dict[str, Any]) -> None:
    tiny["loss"] = {"name": "exploding_sft"}
    result = _run(tiny, ["train.max_steps=8"], {"stop_on": ["exploding_gradient"]})
    assert result.steps == 5 and result.stopped.startswith("diagnostics: the gradient norm jumped")


def test_schedule_ending_before_training(tiny: dict[str, Any]) -> None:
    tiny["update"] = {"name": "full", "learning_rate": 3e-3, "schedule_steps": 3}
    _run(tiny, ["train.max_steps=6"])
    assert _kinds(tiny) == ["schedule_ends_early"]
    assert "reached 0 at step 4 but the run goes on to step 6" in _findings(tiny)[0]["message"]


def test_nan_loss_is_explained(tiny: dict[str, Any]) -> None:
    tiny["loss"] = {"name": "nan_sft"}
    with pytest.raises(TrainingError, match="not finite"):
        _run(tiny, ["train.max_steps=6"])
    assert _kinds(tiny) == ["loss_not_finite"]
    assert "around step 3" in _findings(tiny)[0]["message"]


def test_no_trainable_parameters(tiny: dict[str, Any]) -> None:
    # The engine refuses such a run before the first hook; the rule words the same finding.
    tiny["update"] = {"name": "full", "freeze": ["*"]}
    with pytest.raises(AligntkError, match="no parameter is trainable"):
        _run(tiny, [])
    finding = rules.no_trainable_parameters(0, 1000)
    assert finding is not None and "froze everything" in finding.message
    assert rules.no_trainable_parameters(10, 1000) is None


def test_diagnostics_can_be_turned_off(tmp_path: Path) -> None:
    recipe = write_tiny_assets(tmp_path / "a", rows=16)
    recipe["update"] = {"name": "full", "learning_rate": 1e-12, "schedule": "constant"}
    _run(recipe, ["train.max_steps=6", "train.batch_size=16"], {"enabled": False})
    assert _kinds(recipe) == []


def test_bad_options_are_named(tiny: dict[str, Any]) -> None:
    # Checked with the recipe, before any model loads, in the wording of every other key.
    with pytest.raises(AligntkError, match=r"plugins.diagnostics.windw: unknown key, did you mean 'window'\?"):
        validate_recipe({**tiny, "plugins": {"diagnostics": {"windw": 3}}}, load_plugins().registry)
    with pytest.raises(AligntkError, match=r"plugins.diagnostics.window: Input should be greater than or equal to 2"):
        validate_recipe({**tiny, "plugins": {"diagnostics": {"window": 1}}}, load_plugins().registry)
    with pytest.raises(AligntkError, match=r"plugins.diagnostcs: no installed plugin is named 'diagnostcs', did you mean"):
        validate_recipe({**tiny, "plugins": {"diagnostcs": {}}}, load_plugins().registry)


# -- rules on hand-written numbers -------------------------------------------------


def _history(losses: list[float], lrs: list[float], norms: list[float]) -> list[dict[str, float]]:
    return [{"step": i + 1, "loss": a, "lr": b, "grad_norm": c} for i, (a, b, c) in enumerate(zip(losses, lrs, norms))]


def test_rules_on_hand_written_metrics() -> None:
    c = rules.DiagnosticsConfig(window=4)
    healthy = _history([2.0, 1.8, 1.5, 1.3], [1e-3] * 4, [1.0, 0.9, 1.1, 0.8])
    for rule in (rules.stalled_learning_rate, rules.vanishing_gradient, rules.exploding_gradient):
        assert rule(healthy, c) is None
    assert rules.schedule_ends_early(healthy, 10) is None
    # Falling loss with a tiny rate is not "stalled"; flat loss with a tiny rate is.
    assert rules.stalled_learning_rate(_history([2.0, 1.8, 1.5, 1.3], [0.0] * 4, [1.0] * 4), c) is None
    assert rules.stalled_learning_rate(_history([2.0, 2.01, 1.99, 2.0], [0.0] * 4, [1.0] * 4), c) is not None
    assert rules.exploding_gradient(_history([1.0] * 4, [1e-3] * 4, [1.0, 1.0, 1.0, math.inf]), c) is not None
    assert rules.exploding_gradient(_history([1.0] * 4, [1e-3] * 4, [1.0, 1.0, 1.0, 9.0]), c) is None
    # Warm-up starts at 0: not "the schedule ended".
    assert rules.schedule_ends_early(_history([1.0, 1.0], [0.0, 1e-3], [1.0, 1.0]), 10) is None
    assert rules.schedule_ends_early(_history([1.0, 1.0], [1e-3, 0.0], [1.0, 1.0]), 2) is None  # last step


# -- forgetting --------------------------------------------------------------------


def test_perplexity_matches_a_hand_computation(tmp_path: Path) -> None:
    tok = char_tokenizer()
    model = tiny_model(tok).eval()
    texts = ["1+2=3", "hello world"]
    (tmp_path / "general.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    evaluator = GeneralPerplexity(GeneralPerplexity.Config(path=tmp_path / "general.jsonl", batch_size=1))
    nll, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tok(text)["input_ids"]])
            logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
            nll -= logp.gather(1, ids[0, 1:, None]).sum().item()
            count += ids.shape[1] - 1
        got = evaluator(model, tok, [])
    assert got["general_ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert got["general_ppl_ratio"] == 1.0


def test_drift_is_relative_to_the_first_call() -> None:
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 4.0]]))
    drift = ParameterDrift(ParameterDrift.Config())
    assert drift(model, None, []) == {"drift": 0.0}
    with torch.no_grad():
        model.weight.add_(torch.tensor([[0.0, 1.0]]))
    assert drift(model, None, [])["drift"] == pytest.approx(1 / 5)


def test_forgetting_before_and_after_a_run(tiny: dict[str, Any], tmp_path: Path) -> None:
    general = tmp_path / "general.txt"
    general.write_text("12+30=42\n7+8=15\n\n40+2=42\n")
    tiny["evaluators"] = [{"name": "perplexity", "path": str(general)}, {"name": "drift"}]
    _run(tiny, ["train.max_steps=4"])
    first, last = read_metrics(Path(tiny["output_dir"]), "eval")
    assert first["step"] == 0 and first["drift"] == 0.0 and first["general_ppl_ratio"] == 1.0
    assert last["step"] == 4 and last["drift"] > 0
    assert last["general_ppl"] == pytest.approx(first["general_ppl"] * last["general_ppl_ratio"])
