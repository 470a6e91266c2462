"""Rejection-sampling fine-tuning (best-of-N): the selection and the loss by hand, a 2-step run, a run that learns."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch
from aligntk_rl import BestOfNLoss, BestOfNSelection, Scored
from aligntk_rl.best_of_n import BestOfNConfig, best_of_n_keep

from helpers import OnesPlugin, token_logps

from aligntk import Models, RecipeError, TrainingError, load_plugins, pad_tokens
from aligntk.recipe import read_recipe, validate_recipe
from aligntk.testing import char_tokenizer, check_loss_contract, read_metrics, run_recipe, tiny_model

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "best_of_n.yaml"


def test_selection_by_hand() -> None:
    rewards = torch.tensor([[0.1, 0.9, 0.5, 0.9], [0.0, 0.0, 0.0, 0.0], [1.0, -1.0, 2.0, 0.5]])
    assert best_of_n_keep(rewards, k=1, threshold=None).tolist() == [
        [False, True, False, False],  # tie at 0.9: the earlier sample
        [True, False, False, False],  # all equal: the first
        [False, False, True, False],
    ]
    assert best_of_n_keep(rewards, k=2, threshold=None).sum(1).tolist() == [2, 2, 2]
    assert best_of_n_keep(rewards, k=None, threshold=0.5).tolist() == [
        [False, True, True, True], [False, False, False, False], [True, False, True, True],
    ]
    assert best_of_n_keep(rewards, k=2, threshold=0.6).tolist() == [
        [False, True, False, True], [False, False, False, False], [True, False, True, False],
    ]
    assert best_of_n_keep(rewards, k=9, threshold=None).all()


def test_the_selection_marks_every_token_of_a_kept_completion() -> None:
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0], [0, 1, 1, 1], [0, 1, 1, 0]], dtype=torch.float32)
    scored = Scored(rewards=torch.tensor([0.2, 0.7, 1.0, 0.0]), group_size=2, mask=mask, logps=torch.zeros_like(mask))
    advantages, returns = BestOfNSelection(BestOfNConfig(k=1))(scored)
    assert returns is None
    torch.testing.assert_close(advantages, mask * torch.tensor([0.0, 1.0, 1.0, 0.0])[:, None])
    with pytest.raises(ValueError, match="set k .* threshold .* or both"):
        BestOfNConfig(k=None)


def _batch(tok: Any, kept: list[bool]) -> dict[str, torch.Tensor]:
    rows = [("1+1=", "2"), ("1+1=", "11"), ("3+4=", "7"), ("3+4=", "70")]
    ids, labels = [], []
    for prompt, completion in rows:
        p = tok(prompt)["input_ids"]
        c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids.append(p + c)
        labels.append([-100] * len(p) + c)
    batch = pad_tokens(ids, tok.pad_token_id, labels)
    mask = (batch["labels"] != -100).float()
    batch["advantages"] = torch.tensor(kept, dtype=torch.float32)[:, None] * mask
    batch["rewards"] = torch.tensor([1.0, 0.0, 0.75, 0.25])
    return batch


def test_loss_is_the_token_mean_nll_over_kept_completions() -> None:
    tok = char_tokenizer()
    model = tiny_model(tok)
    kept = [True, False, False, True]
    batch = _batch(tok, kept)
    loss = BestOfNLoss(BestOfNLoss.Config(chunk_size=0))
    out = loss(Models({"policy": model}), batch)
    (out.sum / out.count).backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    logps = token_logps(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                        batch["input_ids"])
    keep = (batch["labels"] != -100) & torch.tensor(kept)[:, None]
    # rows 0 ("2" + eos: 2 tokens) and 3 ("70" + eos: 3 tokens)
    assert out.count.item() == loss.count(batch).item() == 5
    hand = -(logps * keep).sum() / 5
    assert (out.sum / out.count).item() == pytest.approx(hand.item(), rel=1e-6)
    hand.backward()
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-4)
    ratio = lambda name: (out.metrics[name][0] / out.metrics[name][1]).item()  # noqa: E731
    assert ratio("acceptance_rate") == 0.5
    assert ratio("kept_reward") == pytest.approx((1.0 + 0.25) / 2)
    assert ratio("reward") == pytest.approx(0.5)
    assert ratio("kept_length") == pytest.approx(2.5)
    # The chunked output layer gives the same sum.
    chunked = BestOfNLoss(BestOfNLoss.Config(chunk_size=2))(Models({"policy": model}), batch)
    torch.testing.assert_close(chunked.sum, out.sum)


def test_the_loss_keeps_the_contract_and_refuses_a_non_selection_advantage() -> None:
    tok = char_tokenizer()
    model = tiny_model(tok)
    batch = _batch(tok, [False, True, True, False])
    checks = check_loss_contract(BestOfNLoss(BestOfNLoss.Config()), Models({"policy": model}), batch)
    assert "ignored tokens get no gradient" in checks
    batch["advantages"] = batch["advantages"] * 0.7
    with pytest.raises(TrainingError, match=r"set the data's advantage to best_of_n"):
        BestOfNLoss(BestOfNLoss.Config())(Models({"policy": model}), batch)


def _recipe(tiny: dict[str, Any], **advantage: Any) -> dict[str, Any]:
    folder = Path(tiny["data"]["path"]).parent
    return {
        **tiny,
        "data": {
            "name": "rollout", "path": str(folder / "train.jsonl"), "num_generations": 8, "max_new_tokens": 4,
            "advantage": {"name": "best_of_n", **advantage},
        },
        "loss": {"name": "best_of_n"},
        "rewards": [{"name": "ones"}],
        "update": {"name": "full", "learning_rate": 1e-2},
    }


def test_shipped_recipe_validates_and_names_its_parts() -> None:
    registry = load_plugins(extra={"ones": OnesPlugin()}).registry
    resolved = validate_recipe(read_recipe(RECIPE), registry, source=RECIPE)
    dumped = resolved.dump()
    assert dumped["data"]["advantage"] == {"name": "best_of_n", "k": 1, "threshold": 1.0}
    assert dumped["loss"][0]["name"] == "best_of_n"


def test_a_wrong_selection_option_is_one_line_naming_the_key(tiny: dict[str, Any]) -> None:
    registry = load_plugins(extra={"ones": OnesPlugin()}).registry
    with pytest.raises(RecipeError, match=r"data\.advantage: advantage 'best_of_n': .*set k .*threshold"):
        validate_recipe(_recipe(tiny, k=None), registry)
    with pytest.raises(RecipeError, match=r"data\.advantage: advantage 'best_of_n': kk: unknown key, did you mean 'k'"):
        validate_recipe(_recipe(tiny, kk=2), registry)


def test_a_two_step_run_logs_acceptance_and_kept_reward(tiny: dict[str, Any]) -> None:
    result = run_recipe(_recipe(tiny, k=2), ["train.max_steps=2", "train.batch_size=2"], plugins={"ones": OnesPlugin()})
    records = read_metrics(result.run_dir)
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert r["acceptance_rate"] == pytest.approx(2 / 8)
        assert r["kept_reward"] >= r["reward"]
        assert {"loss", "kept_length", "completion_length", "reward"} <= r.keys()
    assert (result.run_dir / "model" / "model.safetensors").exists()


@pytest.mark.slow  # 95 s on 2 busy CPU cores (reward 0.12 -> 0.98)
def test_a_short_best_of_n_run_raises_the_mean_reward(tiny: dict[str, Any]) -> None:
    start = time.monotonic()
    result = run_recipe(_recipe(tiny, k=1), ["train.max_steps=20", "train.batch_size=4"], plugins={"ones": OnesPlugin()})
    rewards = [r["reward"] for r in read_metrics(result.run_dir)]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.2, rewards
    print(f"best_of_n: reward {sum(rewards[:5]) / 5:.3f} -> {sum(rewards[-5:]) / 5:.3f} in {time.monotonic() - start:.0f} s")
