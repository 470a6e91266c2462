"""Unpaired preference methods: KTO and BCO against TRL, the ``unpaired_preference`` data, and
two-step runs of every new po loss (kto, bco, cpo, orpo, MPO as a recipe list).

* KTO: ``trl.KTOTrainer._compute_loss`` (TRL 1.16), called with a stub ``self``; a fake model
  hands it per-token log-probs (float64 leaf: value and gradient to 1e-10), and on a tiny
  Llama (float32: loss and every parameter's gradient).
* BCO: TRL 1.16 no longer ships a BCO trainer (it was in ``trl.experimental.bco`` before), so
  the reference is ``_TRLRunningMoments`` and ``_trl_bco_loss`` below, copied line for line from
  ``trl/experimental/bco/bco_trainer.py`` (``RunningMoments.update``, ``BCOTrainer.bco_loss``;
  Apache-2.0, HuggingFace), run over three batches so the running mean matters.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_weights

from aligntk import DataContext, DataError, Models, hookimpl, logps_from_logits
from aligntk.models import frozen_copy
from aligntk.testing import char_tokenizer, read_metrics, run_recipe, tiny_model, write_tiny_assets
from aligntk_po.kto import BCOLoss, KTOLoss, bco_loss, kto_loss, kto_reference_point, running_mean_update
from aligntk_po.unpaired import UnpairedPreferenceData


class _Accelerator:
    device = torch.device("cpu")
    use_distributed = False

    @staticmethod
    def gather_for_metrics(x: torch.Tensor) -> torch.Tensor:
        return x


def _kto_stub(loss_type: str, beta: float, wd: float, wu: float) -> SimpleNamespace:
    from trl import KTOTrainer

    stub = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_Accelerator(), precompute_ref_logps=True,
        calculate_KL=loss_type == "kto", loss_type=loss_type, beta=beta, desirable_weight=wd,
        undesirable_weight=wu, aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    stub._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(stub, model, batch)
    return stub


def _outputs(log_probs: torch.Tensor) -> SimpleNamespace:
    zeros = torch.zeros_like(log_probs.detach())
    return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros)


@pytest.mark.parametrize(
    ("loss_type", "beta", "wd", "wu"),
    [("kto", 0.1, 1.0, 1.0), ("kto", 0.5, 1.33, 0.8), ("apo_zero_unpaired", 0.2, 1.0, 1.5)],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_kto_matches_trl_value_and_grad_float64(loss_type: str, beta: float, wd: float, wu: float, seed: int) -> None:
    from trl import KTOTrainer

    g = torch.Generator().manual_seed(seed)
    b, width = 6, 9
    mask = torch.zeros(b, width, dtype=torch.long)
    for row in range(b):
        start = int(torch.randint(1, 4, (1,), generator=g))
        mask[row, start : int(torch.randint(start + 1, width + 1, (1,), generator=g))] = 1
    shift = mask[:, 1:].double()
    leaf = (-torch.rand(b, width - 1, generator=g, dtype=torch.float64) * 2).requires_grad_()
    kl_policy = -torch.rand(b, width - 1, generator=g, dtype=torch.float64) * shift
    ref = -torch.rand(b, generator=g, dtype=torch.float64) * 6
    ref_kl = -torch.rand(b, generator=g, dtype=torch.float64) * 3  # KL below 0 for some seeds: clamped
    label = torch.tensor([True, False, True, True, False, False])
    batch = {
        "input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
        "label": label, "ref_logps": ref, "ref_KL_logps": ref_kl,
        "KL_input_ids": torch.ones_like(mask), "KL_attention_mask": torch.ones_like(mask), "KL_completion_mask": mask,
    }  # fmt: skip

    def model(input_ids: torch.Tensor, **_: Any) -> SimpleNamespace:
        return _outputs(kl_policy if bool((input_ids == 1).all()) else leaf * shift)

    theirs = KTOTrainer._compute_loss(_kto_stub(loss_type, beta, wd, wu), model, batch, return_outputs=False)
    (their_grad,) = torch.autograd.grad(theirs, leaf)
    policy = (leaf * shift).sum(1)
    kl = kto_reference_point(kl_policy.sum(1), ref_kl)
    ours = kto_loss(policy, ref, label, kl, beta, wd, wu, loss_type).mean()  # type: ignore[arg-type]
    (our_grad,) = torch.autograd.grad(ours, leaf)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(our_grad, their_grad, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------
# BCO: TRL's code (trl/experimental/bco/bco_trainer.py), copied verbatim in its arithmetic
# --------------------------------------------------------------------------------------


class _TRLRunningMoments:
    """TRL's ``RunningMoments`` (non-distributed path)."""

    def __init__(self) -> None:
        self.mean, self.std, self.var, self.count = 0.0, 1.0, 1.0, 1e-24

    @torch.no_grad()
    def update(self, xs: torch.Tensor) -> None:
        xs_count = xs.numel()
        xs_var, xs_mean = torch.var_mean(xs, unbiased=False)
        xs_mean, xs_var = xs_mean.float(), xs_var.float()
        delta = xs_mean - self.mean
        tot_count = self.count + xs_count
        new_sum = xs_var * xs_count
        old_sum = self.var * self.count + delta**2 * self.count * xs_count / tot_count
        tot_sum = old_sum + new_sum
        self.mean += (delta * xs_count / tot_count).item()
        new_var = tot_sum / tot_count
        self.std = (new_var * tot_count / (tot_count - 1)).float().sqrt().item()
        self.var = new_var.item()
        self.count = tot_count


def _trl_bco_loss(running: _TRLRunningMoments, pc: Any, pr: Any, rc: Any, rr: Any, beta: float) -> torch.Tensor:
    """TRL's ``BCOTrainer.bco_loss`` without UDM (``do_train=True``), then ``losses.nanmean()``."""
    chosen_rewards = beta * (pc - rc)
    rejected_rewards = beta * (pr - rr)
    running.update(torch.cat((chosen_rewards, rejected_rewards), 0).detach())
    delta = torch.as_tensor(running.mean, device=chosen_rewards.device)
    chosen_losses = -F.logsigmoid(chosen_rewards - delta)
    rejected_losses = -F.logsigmoid(-(rejected_rewards - delta))
    return torch.cat((chosen_losses, rejected_losses), dim=0).nanmean()


@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_bco_matches_trl_over_three_batches(beta: float) -> None:
    g = torch.Generator().manual_seed(3)
    theirs_running, mean, count = _TRLRunningMoments(), 0.0, 1e-24
    for _ in range(3):
        label = torch.rand(8, generator=g) < 0.5
        label[0], label[1] = True, False
        policy = (-torch.rand(8, generator=g, dtype=torch.float64) * 9).requires_grad_()
        ref = -torch.rand(8, generator=g, dtype=torch.float64) * 9
        theirs = _trl_bco_loss(theirs_running, policy[label], policy[~label], ref[label], ref[~label], beta)
        (their_grad,) = torch.autograd.grad(theirs, policy)
        mean, count = running_mean_update(mean, count, beta * (policy - ref))
        ours = bco_loss(policy, ref, label, mean, beta).mean()
        (our_grad,) = torch.autograd.grad(ours, policy)
        assert mean == pytest.approx(theirs_running.mean, rel=1e-6, abs=1e-7)  # TRL keeps float32 steps
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(our_grad, their_grad, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------
# The data
# --------------------------------------------------------------------------------------


ROWS = [
    {"prompt": "1+2=", "completion": "3", "label": True},
    {"prompt": "12+30=", "completion": "41", "label": False},
    {"prompt": "5+5=", "completion": "10", "label": True},
    {"prompt": "7+8=", "completion": "16", "label": "false"},
]


def _data(tmp_path: Path, rows: list[dict[str, Any]], **options: Any) -> tuple[UnpairedPreferenceData, Any, Any]:
    path = tmp_path / "unpaired.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = char_tokenizer("0123456789+=")
    data = UnpairedPreferenceData(UnpairedPreferenceData.Config(path=path, **options))
    return data, data.load(DataContext(tokenizer=tok, seed=0)), tok


def test_unpaired_data_rotates_completions_for_the_kl_rows(tmp_path: Path) -> None:
    data, splits, tok = _data(tmp_path, ROWS)
    examples = sorted(splits.train, key=lambda e: e["prompt_ids"])  # any order: the rotation is per batch
    batch = data.collate(examples)
    assert batch["label"].tolist() == [bool(e["label"]) for e in examples]
    for i, e in enumerate(examples):
        other = examples[i - 1]  # row 0 takes the last row's completion, as TRL
        kl_ids = [t for t, m in zip(batch["kl_input_ids"][i].tolist(), batch["kl_attention_mask"][i].tolist()) if m]
        assert kl_ids == e["prompt_ids"] + other["completion_ids"]
        kl_targets = [t for t in batch["kl_labels"][i].tolist() if t != -100]
        assert kl_targets == other["completion_ids"]
        targets = [t for t in batch["labels"][i].tolist() if t != -100]
        assert targets == e["completion_ids"] and targets[-1] == tok.eos_token_id


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "1+2=", "chosen": "3", "rejected": "4"}, "a preference pair"),
        ({"prompt": "1+2=", "completion": "3", "label": 2}, "'label' must be true or false"),
        ({"prompt": "1+2=", "completion": "3"}, "missing 'label'"),
        ({"prompt": "1+2=", "completion": ["3"], "label": True}, "'completion' must be a string"),
    ],
)
def test_unpaired_data_bad_rows_name_the_line(tmp_path: Path, row: dict[str, Any], message: str) -> None:
    with pytest.raises(DataError, match=rf"unpaired.jsonl:2: .*{message}"):
        _data(tmp_path, [ROWS[0], row])


# --------------------------------------------------------------------------------------
# The components on a tiny model
# --------------------------------------------------------------------------------------


def test_kto_component_matches_trl_on_a_model(tmp_path: Path) -> None:
    from trl import KTOTrainer

    data, splits, tok = _data(tmp_path, ROWS)
    batch = data.collate(list(splits.train))
    policy, reference = tiny_model(tok), frozen_copy(tiny_model(tok, seed=1))
    models = Models({"policy": policy, "reference": reference})
    loss = KTOLoss(KTOLoss.Config(beta=0.5, undesirable_weight=1.2, chunk_size=0, reference="live"))
    out = loss(models, batch)
    assert out.count.item() == 4
    ours = out.sum / out.count
    params = list(policy.parameters())
    g_ours = torch.autograd.grad(ours, params, allow_unused=True)

    def model(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, **_: Any) -> Any:
        logits = policy(input_ids=input_ids, attention_mask=attention_mask).logits
        return _outputs(logps_from_logits(logits, labels).logps[:, 1:])

    with torch.no_grad():
        ref = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ref_kl = reference(input_ids=batch["kl_input_ids"], attention_mask=batch["kl_attention_mask"]).logits
    inputs = {
        "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
        "completion_mask": (batch["labels"] != -100).long(), "label": batch["label"],
        "KL_input_ids": batch["kl_input_ids"], "KL_attention_mask": batch["kl_attention_mask"],
        "KL_completion_mask": (batch["kl_labels"] != -100).long(),
        "ref_logps": logps_from_logits(ref, batch["labels"]).logps.sum(-1),
        "ref_KL_logps": logps_from_logits(ref_kl, batch["kl_labels"]).logps.sum(-1),
    }  # fmt: skip
    theirs = KTOTrainer._compute_loss(_kto_stub("kto", 0.5, 1.0, 1.2), model, inputs, return_outputs=False)
    g_theirs = torch.autograd.grad(theirs, params, allow_unused=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_ours, g_theirs):
        if a is not None and b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert "kl" in out.metrics and out.metrics["rewards/chosen"][1].item() == 2


def test_bco_running_mean_moves_in_training_only(tmp_path: Path) -> None:
    data, splits, tok = _data(tmp_path, ROWS)
    batch = data.collate(list(splits.train))
    policy = tiny_model(tok)
    models = Models({"policy": policy, "reference": frozen_copy(tiny_model(tok, seed=1))})
    loss = BCOLoss(BCOLoss.Config(reference="live"))
    policy.eval()
    loss(models, batch)
    assert float(loss.running.mean) == 0.0
    policy.train()
    out = loss(models, batch)
    assert float(loss.running.count) == pytest.approx(4.0)
    assert out.metrics["delta"].item() / 4 == pytest.approx(float(loss.running.mean))
    caps = BCOLoss.capabilities(BCOLoss.Config())
    assert caps.heads and caps.whole_batch and caps.precompute


# --------------------------------------------------------------------------------------
# Two-step runs of every new loss, the shipped recipes, BCO's exact resume
# --------------------------------------------------------------------------------------


def _recipe(folder: Path, unpaired: bool) -> dict[str, Any]:
    recipe = write_tiny_assets(folder)
    rows = []
    for i in range(24):
        a, b = i % 7 * 3, i % 5 * 11
        rows.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)})
    if unpaired:
        sides = ("chosen", "rejected")
        rows = [{"prompt": r["prompt"], "completion": r[s], "label": s == "chosen"} for r in rows for s in sides]
    for name, part in (("train.jsonl", rows[:-8]), ("eval.jsonl", rows[-8:])):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    recipe["data"] = {
        "name": "unpaired_preference" if unpaired else "preference",
        "path": str(folder / "train.jsonl"),
        "eval_path": str(folder / "eval.jsonl"),
        "max_length": 16,
    }
    recipe.pop("evaluators", None)
    return recipe


@pytest.mark.parametrize(
    "loss",
    [
        {"name": "kto"},
        {"name": "bco"},
        {"name": "cpo"},
        {"name": "orpo"},
        [{"name": "dpo", "loss_type": "sigmoid", "weight": 0.8}, {"name": "dpo", "loss_type": "sft", "weight": 0.2}],
    ],
    ids=lambda loss: loss["name"] if isinstance(loss, dict) else "mpo",
)
def test_new_losses_run_two_steps(tmp_path: Path, loss: Any) -> None:
    name = loss["name"] if isinstance(loss, dict) else "dpo"
    recipe = _recipe(tmp_path, unpaired=name in ("kto", "bco"))
    recipe["loss"] = loss
    result = run_recipe(recipe)
    steps = read_metrics(Path(result.run_dir))
    assert [r["step"] for r in steps] == [1, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in steps)
    if isinstance(loss, list):
        assert {"dpo.0/loss", "dpo.1/loss"} <= set(steps[0])
        assert steps[0]["loss"] == pytest.approx(0.8 * steps[0]["dpo.0/loss"] + 0.2 * steps[0]["dpo.1/loss"], rel=1e-5)
    evals = read_metrics(Path(result.run_dir), split="eval")
    assert evals and all(math.isfinite(r["eval_loss"]) for r in evals)


def test_kto_refuses_gradient_accumulation(tmp_path: Path) -> None:
    from aligntk.errors import AligntkError

    recipe = _recipe(tmp_path, unpaired=True)
    recipe["loss"] = {"name": "kto"}
    with pytest.raises(AligntkError, match="needs one micro-batch per step"):
        run_recipe(recipe, ["train.grad_accum=2"])


class _StopAt2:
    @hookimpl
    def aligntk_on_step_end(self, run: Any, step: int, metrics: dict[str, float]) -> str | None:
        return "test stop" if step == 2 else None


def test_bco_resume_is_exact(tmp_path: Path) -> None:
    """The running reward mean is checkpointed with the policy: a resumed run ends where an uninterrupted one does."""
    recipe = _recipe(tmp_path, unpaired=True)
    recipe["loss"] = {"name": "bco"}
    common = ["train.max_steps=4", "train.save_every=2", "train.eval_every=100"]
    whole = run_recipe(recipe, [*common, f"output_dir={tmp_path / 'whole'}"])
    run_recipe(recipe, [*common, f"output_dir={tmp_path / 'cut'}"], plugins={"stop": _StopAt2()})
    resumed = run_recipe(recipe, [*common, f"output_dir={tmp_path / 'cut'}"], resume=True)
    assert_same_weights(whole.run_dir, resumed.run_dir)
    from safetensors.torch import load_file

    heads = [load_file(str(Path(r.run_dir) / "model" / "heads.safetensors")) for r in (whole, resumed)]
    assert heads[0].keys() == heads[1].keys() and any("mean" in k for k in heads[0])
    for k in heads[0]:
        assert torch.equal(heads[0][k], heads[1][k]), k
    assert read_metrics(whole.run_dir)[-1]["delta"] == read_metrics(resumed.run_dir)[-1]["delta"]


@pytest.mark.parametrize(("name", "data"), [("kto.yaml", "unpaired_preference"), ("orpo.yaml", "preference")])
def test_shipped_recipes_validate(name: str, data: str) -> None:
    from aligntk import load_plugins
    from aligntk.recipe import read_recipe, validate_recipe

    path = Path(__file__).resolve().parents[1] / "recipes" / name
    resolved = validate_recipe(read_recipe(path), load_plugins().registry, source=path)
    assert resolved.data.name == data
