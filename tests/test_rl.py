"""Online policy optimization: estimators by hand, the first-step gradient, and a run that learns."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from aligntk_rl import GRPOLoss, RolloutData
from aligntk_rl.estimators import K1, K2, K3, KLConfig, group_advantages, rloo_advantages

from helpers import OnesPlugin, token_logps

from aligntk import Models
from aligntk.testing import char_tokenizer, read_metrics, run_recipe, tiny_model


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


@pytest.mark.parametrize("recorded", [True, False], ids=["old-recorded", "old-absent"])
@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_first_step_ratio_is_one_and_gradient_is_advantage_weighted_logprob(aggregation: str, recorded: bool) -> None:
    tok = char_tokenizer()
    model = tiny_model(tok)
    batch = _rollout_batch(model, tok)
    if not recorded:  # one iteration per rollout: the loss takes its own log-probs as the old ones
        del batch["old_logps"]
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


@pytest.mark.parametrize("iterations", [1, 2])
def test_rollouts_record_old_logps_only_when_the_policy_moves_before_it_trains(
    tmp_path: Path, iterations: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    import aligntk_rl.data as rollout_data

    from helpers import Ones

    tok = char_tokenizer()
    policy, reference = tiny_model(tok), tiny_model(tok)
    (tmp_path / "p.jsonl").write_text('{"prompt": "1+1=", "completion": "2"}\n')
    config = rollout_data.RolloutConfig(path=tmp_path / "p.jsonl", num_generations=2, max_new_tokens=3, iterations=iterations)
    data = RolloutData(config)
    data.tokenizer, data.rewards, data.reward_names = tok, [(1.0, Ones(Ones.Config()))], ["ones"]
    scored_with: list[str] = []
    forward = rollout_data.policy_forward

    def counting(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        scored_with.append("reference" if model is reference else "policy")
        return forward(model, *args, **kwargs)

    monkeypatch.setattr(rollout_data, "policy_forward", counting)
    prompt = {"prompt": "1+1=", "prompt_ids": tok("1+1=")["input_ids"], "reference": "2"}
    rows = data.rollout(Models({"policy": policy, "reference": reference}), [prompt])
    assert len(rows) == 2 and all("ref_logps" in r and "advantages" in r for r in rows)
    assert all(("old_logps" in r) == (iterations > 1) for r in rows)
    # The policy scores its samples only when the old log-probs are needed.
    assert scored_with == (["policy", "reference"] if iterations > 1 else ["reference"])


def test_kl_penalty_is_zero_against_itself_and_counts_units() -> None:
    tok = char_tokenizer()
    model = tiny_model(tok)
    batch = _rollout_batch(model, tok)
    out = GRPOLoss(GRPOLoss.Config(beta=1.0))(Models({"policy": model}), batch)
    assert out.metrics["kl"][0].item() == pytest.approx(0.0, abs=1e-6)
    assert out.count.item() == (batch["labels"] != -100).sum().item()
    seq = GRPOLoss(GRPOLoss.Config(aggregation="sequence"))
    assert seq.count(batch).item() == 3


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


def _preference_pairs(path: Path, n: int, seed: int) -> list[tuple[str, str, str]]:
    """Pairs that prefer a '1' (the ``ones`` reward's taste): chosen is rejected with one digit made '1'."""
    import json
    import random

    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        a, b = rng.randrange(50), rng.randrange(50)
        rejected = "".join(rng.choice("023456789") for _ in range(rng.randint(1, 3)))
        at = rng.randrange(len(rejected))
        pairs.append((f"{a}+{b}=", rejected[:at] + "1" + rejected[at + 1 :], rejected))
    with path.open("w") as f:
        for prompt, chosen, rejected in pairs:
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    return pairs


def test_a_trained_reward_model_scores_rollouts(tiny: dict[str, Any], tmp_path: Path) -> None:
    """Train a one-score reward model through the engine, then score held-out pairs with the reward."""
    from aligntk_rl import RewardModelScore

    folder = Path(tiny["data"]["path"]).parent
    _preference_pairs(folder / "prefs.jsonl", 64, seed=0)
    held_out = _preference_pairs(folder / "prefs_eval.jsonl", 32, seed=1)
    recipe = {
        **tiny,
        "output_dir": str(tmp_path / "rm"),
        "model": {**tiny["model"], "task": "sequence_classification", "num_labels": 1},
        "data": {"name": "preference", "path": str(folder / "prefs.jsonl"),
                 "eval_path": str(folder / "prefs_eval.jsonl"), "max_length": 16},
        "loss": {"name": "reward_model"},
        "update": {"name": "full", "learning_rate": 3e-3, "warmup_steps": 0},
    }
    result = run_recipe(recipe, ["train.max_steps=20", "train.batch_size=16"])
    before = read_metrics(result.run_dir, split="eval")[0]
    assert before["step"] == 0

    reward = RewardModelScore(RewardModelScore.Config(path=result.run_dir / "model"))
    prompts = [p for p, _, _ in held_out]
    chosen = reward(prompts, [c for _, c, _ in held_out])
    rejected = reward(prompts, [r for _, _, r in held_out])
    assert chosen.shape == rejected.shape == (32,) and torch.isfinite(chosen).all()
    accuracy = (chosen > rejected).float().mean().item()
    # Far above chance (0.5) and above the untrained model on the same pairs.
    assert accuracy >= 0.9 and accuracy > before["eval_accuracy"] + 0.2, (accuracy, before)


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


def test_named_choice_reads_the_answer_out_of_a_sentence() -> None:
    from aligntk import named_choice

    choices = ["positive", "negative"]
    assert named_choice('The word "dismal" is Negative.', choices) == "negative"
    assert named_choice("POSITIVE", choices) == "positive"
    assert named_choice("positive or negative?", choices) is None  # a hedge is no answer
    assert named_choice("nonnegative, positively", choices) is None  # whole words only
    assert named_choice("", choices) is None
    assert named_choice("I have no opinion.", ["no opinion", "yes"]) == "no opinion"


def test_choice_reward_pays_for_the_right_named_answer() -> None:
    from pydantic import ValidationError

    from aligntk_rl import ChoiceAnswer

    reward = ChoiceAnswer(ChoiceAnswer.Config(choices=["positive", "negative"]))
    completions = ["It is negative.", "positive or negative", "Positive!", "no idea", "negative"]
    references = ["negative", "negative", "positive", "positive", "positive"]
    scores = reward(["p"] * 5, completions, references=references)
    assert scores.tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="reference answers"):
        reward(["p"], ["positive"])
    with pytest.raises(ValidationError):
        ChoiceAnswer.Config(choices=["only"])
