"""GKD (on-policy distillation) against TRL 1.16's own ``GKDTrainer``, the lambda mixing, a run.

The divergence: ``GKDTrainer.generalized_jsd_loss`` (a static method) and aligntk's
``generalized_jsd`` on the same leaf logits, value and gradient. The loss: TRL's
``GKDTrainer.compute_loss`` called unbound on a stand-in ``self`` (the teacher and
``beta``) with a tiny student and teacher, against the ``gkd`` loss on the same batch,
value and gradient with respect to every student parameter.
"""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from aligntk_rl import GKDData, GKDLoss
from aligntk_rl.gkd import generalized_jsd

from aligntk import Models, pad_tokens
from aligntk.testing import char_tokenizer, check_loss_contract, read_metrics, run_recipe, tiny_model

trl_gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
from trl.experimental.gkd import GKDConfig as TRLConfig  # noqa: E402

GKDTrainer = trl_gkd.GKDTrainer
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "gkd.yaml"


@pytest.mark.parametrize(("beta", "temperature"), [(0.5, 1.0), (0.1, 1.0), (0.9, 2.0), (0.0, 1.0), (1.0, 0.7)])
def test_jsd_value_and_gradient_equal_trls(beta: float, temperature: float) -> None:
    g = torch.Generator().manual_seed(0)
    student = torch.randn(3, 5, 11, generator=g).requires_grad_(True)
    teacher = torch.randn(3, 5, 11, generator=g)
    labels = torch.randint(0, 11, (3, 5), generator=g)
    labels[0, :2] = labels[2, 3:] = -100
    want = GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta, temperature=temperature)
    (want_grad,) = torch.autograd.grad(want, student)
    mask = labels != -100
    got = generalized_jsd(student[mask], teacher[mask], beta, temperature).sum() / mask.sum()
    (got_grad,) = torch.autograd.grad(got, student)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-7, rtol=1e-5)


def _batch(tok: Any) -> dict[str, torch.Tensor]:
    ids, labels = [], []
    for prompt, completion in [("1+1=", "2"), ("12+3=", "15"), ("3+4=", "701")]:
        p = tok(prompt)["input_ids"]
        c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids.append(p + c)
        labels.append([-100] * len(p) + c)
    return pad_tokens(ids, tok.pad_token_id, labels)


@pytest.mark.parametrize("beta", [0.5, 0.0, 1.0])
def test_loss_and_gradient_equal_trls_compute_loss(beta: float) -> None:
    tok = char_tokenizer()
    student = tiny_model(tok, seed=0)
    teacher = tiny_model(tok, seed=1, hidden_size=32, intermediate_size=64).eval()
    batch = _batch(tok)
    this = types.SimpleNamespace(teacher_model=teacher, beta=beta,
                                 generalized_jsd_loss=GKDTrainer.generalized_jsd_loss)
    want = GKDTrainer.compute_loss(this, student, dict(batch))
    want.backward()
    want_grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()

    loss = GKDLoss(GKDLoss.Config(beta=beta))
    out = loss(Models({"policy": student, "teacher": teacher}), batch)
    assert out.count.item() == loss.count(batch).item() == 2 + 3 + 4
    (out.sum / out.count).backward()
    torch.testing.assert_close(out.sum / out.count, want.detach(), atol=1e-6, rtol=1e-5)
    for got, exp in zip((p.grad for p in student.parameters()), want_grads):
        torch.testing.assert_close(got, exp, atol=1e-6, rtol=1e-4)
    checks = check_loss_contract(loss, Models({"policy": student, "teacher": teacher}), batch)
    assert "micro-batch split gives the same sum and count" in checks


def test_defaults_are_trls() -> None:
    trl = {f.name: f.default for f in dataclasses.fields(TRLConfig) if f.default is not dataclasses.MISSING}
    data = {name: f.default for name, f in GKDData.Config.model_fields.items()}
    loss = GKDLoss.Config()
    assert (data["lmbda"], data["temperature"], data["max_new_tokens"], data["seq_kd"]) == (
        trl["lmbda"], trl["temperature"], trl["max_new_tokens"], trl["seq_kd"]) == (0.5, 0.9, 128, False)
    assert loss.beta == trl["beta"] == 0.5
    assert loss.temperature == 1.0  # TRL's compute_loss calls generalized_jsd_loss with its default 1.0


def _recipe(tiny: dict[str, Any], **data: Any) -> dict[str, Any]:
    folder = Path(tiny["data"]["path"]).parent
    teacher = {"config": {**tiny["model"]["config"], "hidden_size": 32, "intermediate_size": 64},
               "tokenizer": tiny["model"]["tokenizer"]}
    return {
        **tiny,
        "models": {"teacher": teacher},
        "data": {"name": "gkd", "path": str(folder / "train.jsonl"), "max_new_tokens": 4, **data},
        "loss": {"name": "gkd"},
        "update": {"name": "full", "learning_rate": 1e-2},
    }


def _rollouts(tiny: dict[str, Any], lmbda: float, **models: Any) -> tuple[list[Any], list[Any]]:
    from aligntk import DataContext

    tok = char_tokenizer()
    seq_kd = "teacher" in models
    data = GKDData(GKDData.Config(path=_recipe(tiny)["data"]["path"], lmbda=lmbda, max_new_tokens=3, seq_kd=seq_kd))
    splits = data.load(DataContext(tokenizer=tok, seed=0))
    examples = [splits.train[i] for i in range(4)]
    return examples, data.rollout(Models({"policy": tiny_model(tok), **models}), examples)


def test_lmbda_zero_uses_the_dataset_and_one_the_students_samples(tiny: dict[str, Any]) -> None:
    examples, rows = _rollouts(tiny, 0.0)
    assert [r["input_ids"] for r in rows] == [e["prompt_ids"] + e["completion_ids"] for e in examples]
    assert not any(r["on_policy"] for r in rows)
    examples, rows = _rollouts(tiny, 1.0)
    assert all(r["on_policy"] for r in rows)
    for e, r in zip(examples, rows):
        assert r["input_ids"][: len(e["prompt_ids"])] == e["prompt_ids"]
        assert 1 <= len(r["input_ids"]) - len(e["prompt_ids"]) <= 3  # sampled, at most max_new_tokens


def test_seq_kd_samples_off_policy_batches_from_the_teacher(tiny: dict[str, Any]) -> None:
    teacher = tiny_model(char_tokenizer(), seed=1)
    calls = []
    generate = teacher.generate
    teacher.generate = lambda **kw: calls.append(kw) or generate(**kw)  # type: ignore[method-assign]
    _, rows = _rollouts(tiny, 0.0, teacher=teacher)
    assert len(calls) == 1 and not any(r["on_policy"] for r in rows)


def test_shipped_recipe_validates() -> None:
    from aligntk import load_plugins
    from aligntk.recipe import read_recipe, validate_recipe

    dumped = validate_recipe(read_recipe(RECIPE), load_plugins().registry, source=RECIPE).dump()
    assert dumped["data"]["name"] == "gkd" and dumped["loss"][0]["name"] == "gkd"


def test_a_two_step_run_mixes_on_policy_samples(tiny: dict[str, Any]) -> None:
    result = run_recipe(_recipe(tiny, lmbda=0.5), ["train.max_steps=2", "train.batch_size=2", "train.grad_accum=2"])
    records = read_metrics(result.run_dir)
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert {"loss", "on_policy_fraction", "completion_length"} <= r.keys()
        assert 0.0 <= r["on_policy_fraction"] <= 1.0
    assert (result.run_dir / "model" / "model.safetensors").exists()


@pytest.mark.slow  # 30 s on 2 busy CPU cores (lmbda 1: the JSD on its own samples 0.0099 -> 0.0015)
def test_a_short_on_policy_run_brings_the_student_to_the_teacher(tiny: dict[str, Any]) -> None:
    import time

    start = time.monotonic()
    result = run_recipe(_recipe(tiny, lmbda=1.0), ["train.max_steps=20", "train.batch_size=8"])
    losses = [r["loss"] for r in read_metrics(result.run_dir)]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, losses
    print(f"gkd: JSD {first:.4f} -> {last:.4f} in {time.monotonic() - start:.0f} s")
