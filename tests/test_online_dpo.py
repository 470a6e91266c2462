"""Online DPO: the pairwise selection, the loss against TRL 1.16's own ``OnlineDPOTrainer.training_step``, a run.

TRL's ``training_step`` is called unbound on a stand-in ``self``: its generation returns
fixed completions, its reward functions fixed rewards, and its own ``_forward`` runs a
tiny policy and a different tiny reference model. aligntk's ``online_dpo`` loss gets the
same model, tokens and rewards (the reference's log-probs as the rollout data would
record them) through the ``pairwise`` selection. The loss value and the gradient with
respect to every policy parameter must agree.
"""

from __future__ import annotations

import dataclasses
import types
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch
from aligntk_rl import OnlineDPOLoss, PairwiseSelection, Scored
from aligntk_rl.pairwise import PairwiseConfig, pairwise_choice

from helpers import OnesPlugin, token_logps

from aligntk import Models, RecipeError, TrainingError, load_plugins, pad_tokens
from aligntk.recipe import read_recipe, validate_recipe
from aligntk.testing import char_tokenizer, check_loss_contract, read_metrics, run_recipe, tiny_model

trl_online_dpo = pytest.importorskip("trl.experimental.online_dpo.online_dpo_trainer")
from trl.experimental.online_dpo import OnlineDPOConfig as TRLConfig  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "online_dpo.yaml"
PROMPTS = ["1+1=", "3+4=", "5+5="]  # one length: TRL left-pads prompts, aligntk right-pads rows
FIRST = ["2", "70", "10"]  # TRL's first half: sample 0 of each prompt
SECOND = ["11", "7", "1"]  # sample 1
REWARDS_FIRST = [1.0, 0.0, 0.5]
REWARDS_SECOND = [0.0, 1.0, 0.5]  # the third pair is a tie


def test_pairwise_choice_by_hand() -> None:
    rewards = torch.tensor([[0.2, 0.9], [0.5, 0.5], [1.0, -1.0]])
    chosen, rejected, paired = pairwise_choice(rewards)
    assert chosen.tolist() == [1, 0, 0] and rejected.tolist() == [0, 1, 1]  # a tie: the first is chosen (TRL)
    assert paired.all()
    assert pairwise_choice(rewards, "skip")[2].tolist() == [True, False, True]
    # More than two samples: the best (earliest on ties) against the worst (latest on ties).
    chosen, rejected, _ = pairwise_choice(torch.tensor([[0.0, 1.0, 1.0, 0.0]]))
    assert (chosen.item(), rejected.item()) == (1, 3)
    with pytest.raises(ValueError, match="at least 2 completions"):
        pairwise_choice(torch.tensor([[1.0]]))


def test_the_selection_marks_chosen_plus_one_and_rejected_minus_one() -> None:
    mask = torch.tensor([[0, 1, 1], [0, 1, 0], [0, 1, 1], [0, 1, 1]], dtype=torch.float32)
    scored = Scored(rewards=torch.tensor([0.0, 1.0, 0.3, 0.3]), group_size=2, mask=mask, logps=torch.zeros_like(mask))
    advantages, returns = PairwiseSelection(PairwiseConfig())(scored)
    assert returns is None
    torch.testing.assert_close(advantages, mask * torch.tensor([-1.0, 1.0, 1.0, -1.0])[:, None])
    skipped, _ = PairwiseSelection(PairwiseConfig(ties="skip"))(scored)
    torch.testing.assert_close(skipped, mask * torch.tensor([-1.0, 1.0, 0.0, 0.0])[:, None])


def _completion_ids(tok: Any, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def _trl_inputs(tok: Any) -> dict[str, torch.Tensor]:
    """TRL's layout: ``2P`` rows, the first sample of every prompt, then the second; completions right-padded."""
    prompt = [tok(p)["input_ids"] for p in PROMPTS] * 2
    comps = [_completion_ids(tok, c) for c in FIRST + SECOND]
    width = max(map(len, comps))
    completion_ids = torch.tensor([c + [tok.pad_token_id] * (width - len(c)) for c in comps])
    completion_mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in comps])
    prompt_ids = torch.tensor(prompt)
    return {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids),
            "completion_ids": completion_ids, "completion_mask": completion_mask}


def _aligntk_batch(tok: Any, reference: torch.nn.Module, ties: str = "first") -> dict[str, torch.Tensor]:
    """The rollout data's layout: each prompt's two samples next to each other, scored by ``pairwise``."""
    ids, labels, rewards = [], [], []
    for p, a, b, ra, rb in zip(PROMPTS, FIRST, SECOND, REWARDS_FIRST, REWARDS_SECOND):
        for c, r in ((a, ra), (b, rb)):
            prompt, comp = tok(p)["input_ids"], _completion_ids(tok, c)
            ids.append(prompt + comp)
            labels.append([-100] * len(prompt) + comp)
            rewards.append(r)
    batch = pad_tokens(ids, tok.pad_token_id, labels)
    mask = (batch["labels"] != -100).float()
    with torch.no_grad():
        ref = token_logps(reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                          batch["input_ids"])
    batch["ref_logps"] = ref * mask
    batch["rewards"] = torch.tensor(rewards)
    scored = Scored(rewards=batch["rewards"], group_size=2, mask=mask, logps=torch.zeros_like(mask))
    batch["advantages"], _ = PairwiseSelection(PairwiseConfig(ties=ties))(scored)
    return batch


def _trl_step(policy: torch.nn.Module, reference: torch.nn.Module, tok: Any, beta: float, loss_type: str) -> float:
    """TRL's ``OnlineDPOTrainer.training_step`` on the fixed samples; leaves the gradient in ``policy``."""
    inputs = _trl_inputs(tok)
    trainer = trl_online_dpo.OnlineDPOTrainer
    this = types.SimpleNamespace(
        args=types.SimpleNamespace(use_vllm=False, missing_eos_penalty=None, loss_type=loss_type,
                                   torch_empty_cache_steps=None, optim="adamw_torch", n_gpu=1,
                                   gradient_accumulation_steps=1),
        max_length=10_000,
        ref_model=reference,
        model=policy,
        beta=beta,
        eos_token_ids=[tok.eos_token_id],
        processing_class=tok,
        reward_funcs=[object()],
        stats=defaultdict(list),
        state=types.SimpleNamespace(global_step=1),
        accelerator=types.SimpleNamespace(gather_for_metrics=lambda x: x, backward=lambda loss: loss.backward()),
        _generate=lambda model, prompts, images=None: (*inputs.values(), None),
        _calculate_rewards_from_functions=lambda **_: torch.tensor(REWARDS_FIRST + REWARDS_SECOND),
    )
    this._forward = types.MethodType(trainer._forward, this)
    return trainer.training_step(this, policy, {"prompt": list(PROMPTS)}).item()


@pytest.mark.parametrize(("loss_type", "beta"), [("sigmoid", 0.1), ("sigmoid", 2.0), ("ipo", 0.5)])
def test_loss_and_gradient_equal_trls_online_dpo(loss_type: str, beta: float) -> None:
    tok = char_tokenizer()
    policy, reference = tiny_model(tok, seed=0), tiny_model(tok, seed=1).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    trl_loss = _trl_step(policy, reference, tok, beta, loss_type)
    trl_grads = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()

    batch = _aligntk_batch(tok, reference)
    loss = OnlineDPOLoss(OnlineDPOLoss.Config(beta=beta, loss_type=loss_type, chunk_size=0))
    out = loss(Models({"policy": policy}), batch)
    assert out.count.item() == loss.count(batch).item() == 3
    (out.sum / out.count).backward()
    assert (out.sum / out.count).item() == pytest.approx(trl_loss, rel=1e-5, abs=1e-6)
    for got, want in zip((p.grad for p in policy.parameters()), trl_grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    # The chunked output layer gives the same sum.
    chunked = OnlineDPOLoss(OnlineDPOLoss.Config(beta=beta, loss_type=loss_type, chunk_size=2))
    torch.testing.assert_close(chunked(Models({"policy": policy}), batch).sum, out.sum)


def test_defaults_are_trls() -> None:
    fields = {f.name: f for f in dataclasses.fields(TRLConfig)}
    beta = fields["beta"].default_factory()  # a list, one beta per epoch; one entry means a constant
    mine = OnlineDPOLoss.Config()
    assert (mine.beta, mine.loss_type) == (beta[0], fields["loss_type"].default) == (0.1, "sigmoid")
    assert len(beta) == 1


def test_skipped_ties_the_contract_and_a_non_pairwise_advantage() -> None:
    tok = char_tokenizer()
    policy, reference = tiny_model(tok, seed=0), tiny_model(tok, seed=1)
    batch = _aligntk_batch(tok, reference, ties="skip")
    loss = OnlineDPOLoss(OnlineDPOLoss.Config())
    assert loss.count(batch).item() == 2
    out = loss(Models({"policy": policy}), batch)
    assert (out.metrics["pair_fraction"][0] / out.metrics["pair_fraction"][1]).item() == pytest.approx(4 / 6)
    keep = [0, 1, 2, 3]  # two whole pairs, so the contract's half split keeps each pair together
    small = {k: v[keep] for k, v in batch.items()}
    checks = check_loss_contract(loss, Models({"policy": policy}), small)
    assert "micro-batch split gives the same sum and count" in checks
    batch["advantages"] = batch["advantages"] * 0.5
    with pytest.raises(TrainingError, match=r"set the data's advantage to pairwise"):
        loss(Models({"policy": policy}), batch)


def _recipe(tiny: dict[str, Any], **loss: Any) -> dict[str, Any]:
    folder = Path(tiny["data"]["path"]).parent
    return {
        **tiny,
        "data": {"name": "rollout", "path": str(folder / "train.jsonl"), "num_generations": 2, "max_new_tokens": 4,
                 "advantage": "pairwise"},
        "loss": {"name": "online_dpo", **loss},
        "rewards": [{"name": "ones"}],
        "update": {"name": "full", "learning_rate": 1e-2},
    }


def test_shipped_recipe_validates() -> None:
    registry = load_plugins(extra={"ones": OnesPlugin()}).registry
    dumped = validate_recipe(read_recipe(RECIPE), registry, source=RECIPE).dump()
    assert dumped["data"]["num_generations"] == 2
    assert dumped["data"]["advantage"]["name"] == "pairwise"
    assert dumped["loss"][0]["name"] == "online_dpo"


def test_a_wrong_option_is_one_line_naming_the_key(tiny: dict[str, Any]) -> None:
    registry = load_plugins(extra={"ones": OnesPlugin()}).registry
    with pytest.raises(RecipeError, match=r"loss_type"):
        validate_recipe(_recipe(tiny, loss_type="hinge"), registry)


def test_a_two_step_run(tiny: dict[str, Any]) -> None:
    result = run_recipe(_recipe(tiny), ["train.max_steps=2", "train.batch_size=2"], plugins={"ones": OnesPlugin()})
    records = read_metrics(result.run_dir)
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert {"loss", "reward", "scores_margin", "rewards/accuracy", "kl", "pair_fraction"} <= r.keys()
        assert r["scores_margin"] >= 0
    assert (result.run_dir / "model" / "model.safetensors").exists()


@pytest.mark.slow  # 118 s on 2 busy CPU cores (reward 0.10 -> 0.98)
def test_a_short_online_dpo_run_raises_the_mean_reward(tiny: dict[str, Any]) -> None:
    import time

    start = time.monotonic()
    recipe = _recipe(tiny, beta=0.5)
    recipe["data"]["advantage"] = {"name": "pairwise", "ties": "skip"}
    result = run_recipe(recipe, ["train.max_steps=30", "train.batch_size=8"], plugins={"ones": OnesPlugin()})
    rewards = [r["reward"] for r in read_metrics(result.run_dir)]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.2, rewards
    print(f"online_dpo: reward {first:.3f} -> {last:.3f} in {time.monotonic() - start:.0f} s")
