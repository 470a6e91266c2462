"""Seeded sampling: each completion is drawn from its own stream (``sample_seed``), so rollouts
do not depend on the batch, the micro-batch size or the process count, and the draw is
from the tempered, top-p softmax and nothing else."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from aligntk import sample_seed
from aligntk.testing import char_tokenizer, read_metrics, run_recipe, tiny_model
from aligntk_rl import HFGenerator
from aligntk_rl.generators import SeededDraw


def test_sample_seed_is_a_fixed_function_of_its_parts() -> None:
    assert sample_seed(0, 1, 2) == sample_seed(0, 1, 2)
    seeds = {sample_seed(0, block, i) for block in range(20) for i in range(50)}
    assert len(seeds) == 1000  # nearby parts give different seeds
    assert all(0 <= s < 2**63 for s in seeds)
    assert sample_seed(1, 2) != sample_seed(12) and sample_seed(1, 2) != sample_seed(2, 1)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8)])
def test_the_seeded_draw_samples_the_tempered_nucleus(temperature: float, top_p: float) -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    probs = torch.softmax(logits[0] / temperature, -1)
    if top_p < 1.0:  # the nucleus by hand: the most likely tokens whose mass first reaches top_p
        order = probs.argsort(descending=True)
        keep = order[: int((probs[order].cumsum(0) < top_p).sum()) + 1]
        probs = torch.zeros_like(probs).index_fill(0, keep, 1.0) * probs
        probs = probs / probs.sum()
    n = 20000
    draw = SeededDraw(range(n), temperature, top_p)
    picks = draw(torch.zeros(n, 1, dtype=torch.long), logits.expand(n, -1).clone()).argmax(-1)
    freq = torch.bincount(picks, minlength=5).double() / n
    assert (freq - probs.double()).abs().max() < 0.012, (freq, probs)  # about 4 standard errors
    assert (freq[probs == 0] == 0).all()  # nothing outside the nucleus


def _generate(model: Any, tok: Any, prompts: list[str], seeds: list[int]) -> list[list[int]]:
    sampling = SimpleNamespace(temperature=1.0, top_p=1.0, max_new_tokens=8)
    ids = [tok(p, add_special_tokens=True)["input_ids"] for p in prompts]
    return HFGenerator(HFGenerator.Config()).sample(model, tok, ids, sampling, seeds).completions


def test_a_completion_depends_on_its_seed_not_on_the_other_rows() -> None:
    tok = char_tokenizer("0123456789+=")
    model = tiny_model(tok).eval()
    prompts = ["1+1=", "23+45=", "7+8=", "12+3="]  # different lengths: left padding differs by batch
    together = _generate(model, tok, prompts, [11, 12, 13, 14])
    alone = [_generate(model, tok, [p], [s])[0] for p, s in zip(prompts, [11, 12, 13, 14])]
    reversed_ = _generate(model, tok, prompts[::-1], [14, 13, 12, 11])[::-1]
    assert together == alone == reversed_
    assert len({tuple(c) for c in together}) > 1
    again = _generate(model, tok, prompts, [21, 22, 23, 24])
    assert again != together  # other seeds, other samples


def test_rollouts_do_not_depend_on_the_micro_batch_size(tmp_path: Path) -> None:
    # One micro-batch of 4 prompts, or two of 2: the same samples, so the same run.
    from aligntk.testing import tiny_classifier, write_tiny_assets

    recipe = write_tiny_assets(tmp_path / "assets")
    scorer = tmp_path / "rm"  # a random one-score model: rewards vary, so the runs learn something
    tok = char_tokenizer("0123456789+=")
    tiny_classifier(tok, num_labels=1, seed=1).save_pretrained(scorer)
    tok.save_pretrained(scorer)
    recipe["data"] = {"name": "rollout", "path": recipe["data"]["path"], "num_generations": 4, "max_new_tokens": 4}
    recipe["loss"] = {"name": "grpo", "beta": 0.04}
    recipe["rewards"] = [{"name": "reward_model", "path": str(scorer)}]
    recipe["train"].update(max_steps=3)
    one = run_recipe(recipe, [f"output_dir={tmp_path / 'one'}", "train.batch_size=4", "train.grad_accum=1"])
    two = run_recipe(recipe, [f"output_dir={tmp_path / 'two'}", "train.batch_size=2", "train.grad_accum=2"])
    keys = ("reward", "completion_length", "loss")
    a, b = read_metrics(one.run_dir), read_metrics(two.run_dir)
    assert [r[k] for r in a for k in keys] == pytest.approx([r[k] for r in b for k in keys], abs=1e-5)
    assert any(r["grad_norm"] > 1e-3 for r in a)


def test_gkd_draws_on_or_off_policy_from_the_micro_batch_seed() -> None:
    from aligntk_rl.gkd import _uniform

    a = [{"sample_seed": sample_seed(0, 3, 7)}, {"sample_seed": sample_seed(0, 3, 8)}]
    assert _uniform(a) == _uniform(a)  # a fixed function of the micro-batch: any process count, resume
    draws = [_uniform([{"sample_seed": sample_seed(0, 0, i)}]) for i in range(2000)]
    assert all(0.0 <= u < 1.0 for u in draws) and abs(sum(draws) / len(draws) - 0.5) < 0.03
