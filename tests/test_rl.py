"""Online policy optimization: estimators by hand, the first-step gradient, and a run that learns."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from aligntk_rl import GRPOLoss, RolloutData
from aligntk_rl.estimators import K1, K2, K3, KLConfig, group_advantages, rloo_advantages

from aligntk import ComponentConfig, Models, hookimpl
from aligntk.testing import char_tokenizer, read_metrics, run_recipe, tiny_model


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Independent reference: every token's log-prob from full logits, ``[B, T]``, position 0 is 0."""
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logps.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return torch.nn.functional.pad(picked, (1, 0))


def test_kl_estimators_known_values() -> None:
    k1, k2, k3 = K1(KLConfig()), K2(KLConfig()), K3(KLConfig())
    logps, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert k1(logps, ref).item() == pytest.approx(math.log(2))
    assert k2(logps, ref).item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert k3(logps, ref).item() == pytest.approx(0.5 + math.log(2) - 1)
    assert k3(ref, ref).item() == 0.0


def test_group_normalization_and_leave_one_out() -> None:
    rewards = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    adv = group_advantages(rewards)
    assert torch.allclose(adv[0], torch.tensor([-1.0, 0.0, 1.0]) / (1.0 + 1e-4))
    assert torch.equal(adv[1], torch.zeros(3))  # all equal: zero advantage, no NaN
    loo = rloo_advantages(rewards)
    assert torch.allclose(loo[0], torch.tensor([1 - 2.5, 2 - 2.0, 3 - 1.5]))
    assert torch.equal(loo[1], torch.zeros(3))


def _rollout_batch(model: torch.nn.Module, tok: Any) -> dict[str, torch.Tensor]:
    data = RolloutData.__new__(RolloutData)
    data.tokenizer = tok
    rows = []
    for prompt, completion, adv in (("1+1=", "2", 1.5), ("3+4=", "71", -0.5), ("9+9=", "18", 0.25)):
        p = tok(prompt)["input_ids"]
        c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        advantages = [0.0] * len(p) + [adv] * len(c)
        rows.append({"input_ids": p + c, "labels": [-100] * len(p) + c, "advantages": advantages, "reward": adv})
    tokens = data.collate_tokens(rows)
    with torch.no_grad():
        old = token_logps(model(**{k: tokens[k] for k in ("input_ids", "attention_mask")}).logits, tokens["input_ids"])
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        row["old_logps"] = old[i, :n].tolist()
        row["ref_logps"] = old[i, :n].tolist()
    return data.collate(rows)


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_first_step_ratio_is_one_and_gradient_is_advantage_weighted_logprob(aggregation: str) -> None:
    tok = char_tokenizer()
    model = tiny_model(tok)
    batch = _rollout_batch(model, tok)
    loss = GRPOLoss(GRPOLoss.Config(beta=0.0, aggregation=aggregation))
    out = loss(Models({"policy": model}), batch)
    assert out.metrics["clip_fraction"][0].item() == 0.0
    out.sum.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    logps = token_logps(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["input_ids"])
    mask = (batch["labels"] != -100).float()
    weighted = -(batch["advantages"] * logps * mask)
    reference = weighted.sum() if aggregation == "token" else (weighted.sum(1) / mask.sum(1)).sum()
    reference.backward()
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-4)
    # Its value is -A per token (ratio 1), whatever the log-probs.
    per_token = -(batch["advantages"] * mask)
    value = per_token.sum() if aggregation == "token" else (per_token.sum(1) / mask.sum(1)).sum()
    assert out.sum.item() == pytest.approx(value.item(), rel=1e-5)


def test_kl_penalty_is_zero_against_itself_and_counts_units() -> None:
    tok = char_tokenizer()
    model = tiny_model(tok)
    batch = _rollout_batch(model, tok)
    out = GRPOLoss(GRPOLoss.Config(beta=1.0))(Models({"policy": model}), batch)
    assert out.metrics["kl"][0].item() == pytest.approx(0.0, abs=1e-6)
    assert out.count.item() == (batch["labels"] != -100).sum().item()
    seq = GRPOLoss(GRPOLoss.Config(aggregation="sequence"))
    assert seq.count(batch).item() == 3


class OnesConfig(ComponentConfig):
    pass


class Ones:
    """A reward that is easy to move: the share of '1' characters in the completion."""

    Config = OnesConfig

    def __init__(self, config: OnesConfig):
        pass

    def __call__(self, prompts: Any, completions: Any, **fields: Any) -> torch.Tensor:
        return torch.tensor([c.count("1") / max(len(c), 1) for c in completions])


class OnesPlugin:
    @hookimpl
    def aligntk_register_rewards(self, register: Any) -> None:
        register("ones", Ones)


def test_a_short_grpo_run_raises_the_mean_reward(tiny: dict[str, Any]) -> None:
    folder = Path(tiny["data"]["path"]).parent
    recipe = {
        **tiny,
        "data": {"name": "rollout", "path": str(folder / "train.jsonl"), "num_generations": 4, "max_new_tokens": 4},
        "loss": {"name": "grpo", "beta": 0.0},
        "rewards": [{"name": "ones"}],
        "update": {"name": "full", "learning_rate": 1e-2},
    }
    result = run_recipe(recipe, ["train.max_steps=30", "train.batch_size=4"], plugins={"ones": OnesPlugin()})
    rewards = [r["reward"] for r in read_metrics(result.run_dir)]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.2, rewards
    record = read_metrics(result.run_dir)[0]
    assert {"kl", "clip_fraction", "entropy", "completion_length", "reward"} <= record.keys()


def test_a_trained_reward_model_scores_rollouts(tiny: dict[str, Any], tmp_path: Path) -> None:
    from aligntk_rl import RewardModelScore
    from transformers import AutoConfig, AutoModelForSequenceClassification

    tok = char_tokenizer("0123456789+=")
    config = AutoConfig.for_model(
        "llama", vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id,
    )
    folder = tmp_path / "rm"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    reward = RewardModelScore(RewardModelScore.Config(path=folder))
    scores = reward(["1+1=", "2+2="], ["2", "5"])
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    assert scores[0] != scores[1]


def test_chunked_grpo_loss_equals_the_plain_one() -> None:
    tok = char_tokenizer()
    model = tiny_model(tok)
    batch = _rollout_batch(model, tok)
    results = []
    for chunk in (0, 3):
        out = GRPOLoss(GRPOLoss.Config(beta=0.1, chunk_size=chunk))(Models({"policy": model}), batch)
        out.sum.backward()
        results.append((out, [p.grad.clone() for p in model.parameters()]))
        model.zero_grad()
    (plain, plain_grads), (chunked, chunked_grads) = results
    torch.testing.assert_close(chunked.sum, plain.sum)
    for name in ("kl", "entropy", "clip_fraction"):
        torch.testing.assert_close(chunked.metrics[name][0], plain.metrics[name][0])
    for a, b in zip(chunked_grads, plain_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
