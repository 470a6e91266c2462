"""PPO with a learned value head, GAE, shared estimator components, several steps per rollout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from aligntk_rl import PPOLoss, Scored
from aligntk_rl.estimators import (
    AggregationConfig,
    FixedLength,
    FixedLengthConfig,
    GAEAdvantage,
    GAEConfig,
    SequenceMean,
    TokenMean,
    clipped_value_loss,
    gae,
)
from aligntk_rl.loss import GRPOConfig
from helpers import OnesPlugin, assert_same_weights, token_logps
from safetensors.torch import load_file

from aligntk import AligntkError, ComponentConfig, Models, RecipeError, hookimpl, load_plugins
from aligntk.recipe import validate_recipe
from aligntk.testing import char_tokenizer, read_metrics, run_recipe, tiny_model


def test_gae_by_hand() -> None:
    gamma, lam, reward = 0.9, 0.8, 2.0
    values = torch.tensor([[0.0, 0.0, 0.5, -0.25, 1.0, 0.0]])
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0, 0.0]])  # prompt, prompt, 3 completion tokens, pad
    rewards = torch.zeros_like(mask)
    rewards[0, 4] = reward
    adv, ret = gae(rewards, values, mask, gamma, lam)
    d4 = reward - 1.0
    d3 = gamma * 1.0 + 0.25
    d2 = gamma * -0.25 - 0.5
    a4 = d4
    a3 = d3 + gamma * lam * a4
    a2 = d2 + gamma * lam * a3
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0.0, a2, a3, a4, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.0, 0.0, a2 + 0.5, a3 - 0.25, a4 + 1.0, 0.0]]))


def test_gae_estimator_places_the_reward_and_kl_penalty() -> None:
    # With zero values, gamma = lam = 1 and no whitening, the advantage is the reward-to-go.
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]])
    logps = torch.tensor([[0.0, -1.0, -1.0, -1.0], [0.0, 0.0, -2.0, 0.0]])
    ref = torch.tensor([[0.0, -1.5, -1.0, -0.5], [0.0, 0.0, -2.5, 0.0]])
    scored = Scored(
        rewards=torch.tensor([1.0, -1.0]), group_size=1, mask=mask, logps=logps, ref_logps=ref,
        values=torch.zeros_like(mask),
    )
    estimator = GAEAdvantage(GAEConfig(gamma=1.0, lam=1.0, kl_coef=0.1, whiten=False))
    adv, ret = estimator(scored)
    kl = -0.1 * (logps - ref) * mask  # per-token reward from the KL penalty
    expected = torch.flip(torch.cumsum(torch.flip(kl, [1]), 1), [1]) * mask
    expected[0, 1:4] += 1.0
    expected[1, 2] += -1.0
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, expected)  # values are 0
    whitened, _ = GAEAdvantage(GAEConfig())(scored)
    on = whitened[mask.bool()]
    assert on.mean().abs() < 1e-5 and on.std().item() == pytest.approx(1.0, rel=1e-4)
    assert torch.equal(whitened[~mask.bool()], torch.zeros(int((~mask.bool()).sum())))


def test_clipped_value_loss_by_hand() -> None:
    values, old, returns = torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0.5, 0.0, 0.0]), torch.tensor([2.0, 1.0, 0.0])
    loss, clipped = clipped_value_loss(values, old, returns, clip=0.2)
    # 1: V moved +0.5, clipped to 0.7: max((1-2)^2, (0.7-2)^2) = 1.69 (clipped term taken)
    # 2: V did not move: (0-1)^2 = 1; 3: V moved to 0.5, clipped to 0.2: max(0.25, 0.04) = 0.25
    torch.testing.assert_close(loss, 0.5 * torch.tensor([1.69, 1.0, 0.25]))
    assert clipped.tolist() == [True, False, False]


def test_aggregations_sum_and_count() -> None:
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    token, sequence = TokenMean(AggregationConfig()), SequenceMean(AggregationConfig())
    fixed = FixedLength(FixedLengthConfig(tokens=4))
    assert (token(per_token, mask).item(), token.count(mask).item()) == (10.0, 4.0)
    assert (sequence(per_token, mask).item(), sequence.count(mask).item()) == (2.0 + 4.0, 2)
    assert (fixed(per_token, mask).item(), fixed.count(mask).item()) == (10.0 / 4, 2)


def test_estimators_are_registered_components_named_in_recipes(tiny: dict[str, Any]) -> None:
    registry = load_plugins().registry
    assert {"group", "rloo", "gae"} <= set(registry.components["advantage"])
    assert {"k1", "k2", "k3"} <= set(registry.components["kl"])
    assert {"token", "sequence", "fixed_length"} <= set(registry.components["aggregation"])
    folder = Path(tiny["data"]["path"]).parent
    recipe = {
        **tiny,
        "data": {"name": "rollout", "path": str(folder / "train.jsonl"), "advantage": {"name": "gae", "lam": 0.9}},
        "loss": {"name": "ppo", "kl": "k1", "aggregation": "sequence"},
        "rewards": [{"name": "exact_answer"}],
    }
    resolved = validate_recipe(recipe, registry)
    dumped = resolved.dump()
    assert dumped["data"]["advantage"] == {"name": "gae", "gamma": 1.0, "lam": 0.9, "kl_coef": 0.0, "whiten": True}
    assert dumped["loss"][0]["kl"] == {"name": "k1"}
    with pytest.raises(RecipeError, match=r"loss\.kl: unknown kl 'k33', did you mean 'k3'\?"):
        validate_recipe({**recipe, "loss": {"name": "ppo", "kl": "k33"}}, registry)
    with pytest.raises(RecipeError, match=r"data\.advantage: advantage 'gae': lamb: unknown key, did you mean 'lam'"):
        validate_recipe({**recipe, "data": {**recipe["data"], "advantage": {"name": "gae", "lamb": 1}}}, registry)


def _ppo_recipe(tiny: dict[str, Any], **data: Any) -> dict[str, Any]:
    folder = Path(tiny["data"]["path"]).parent
    return {
        **tiny,
        "data": {
            "name": "rollout", "path": str(folder / "train.jsonl"), "num_generations": 4, "max_new_tokens": 4,
            "advantage": {"name": "gae", "kl_coef": 0.05}, **data,
        },
        "loss": {"name": "ppo", "vf_coef": 0.5},
        "rewards": [{"name": "ones"}],
        "update": {"name": "full", "learning_rate": 1e-2},
    }


def test_ppo_first_step_is_the_advantage_weighted_logprob_gradient() -> None:
    tok = char_tokenizer()
    model = tiny_model(tok)
    loss = PPOLoss(PPOLoss.Config(vf_coef=0.0))
    head = loss.heads(model)["value"]
    ids = torch.tensor([tok("1+1=2")["input_ids"] + [tok.eos_token_id]])
    labels = ids.clone()
    labels[:, :4] = -100
    with torch.no_grad():
        old = token_logps(model(input_ids=ids).logits, ids)
    mask = (labels != -100).float()
    adv = torch.linspace(-1, 1, ids.size(1))[None] * mask
    batch = {
        "input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "old_logps": old,
        "ref_logps": old, "advantages": adv, "rewards": torch.tensor([1.0]),
        "old_values": torch.zeros_like(adv), "returns": torch.ones_like(adv) * mask,
    }
    out = loss(Models({"policy": model}, heads={"value": head}), batch)
    assert out.metrics["clip_fraction"][0].item() == 0.0
    # Value head starts at zero: the value loss is 0.5 * mean(returns^2) = 0.5 per token.
    assert (out.metrics["value_loss"][0] / out.metrics["value_loss"][1]).item() == pytest.approx(0.5)
    out.sum.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    (-(adv * token_logps(model(input_ids=ids).logits, ids) * mask).sum()).backward()
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-4)


def test_a_short_ppo_run_raises_the_reward_and_saves_its_value_head(tiny: dict[str, Any]) -> None:
    result = run_recipe(_ppo_recipe(tiny), ["train.max_steps=30", "train.batch_size=4"], plugins={"ones": OnesPlugin()})
    records = read_metrics(result.run_dir)
    rewards = [r["reward"] for r in records]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.2, rewards
    assert {"value_loss", "value", "value_clip_fraction", "kl", "entropy"} <= records[0].keys()
    assert records[-1]["value"] != 0.0  # the head learned something
    head = load_file(str(result.run_dir / "model" / "heads.safetensors"))
    assert set(head) == {"value.linear.weight", "value.linear.bias"}
    assert head["value.linear.weight"].abs().sum() > 0
    # The Hugging Face model folder stays loadable without the head.
    weights = json.loads((result.run_dir / "model" / "config.json").read_text())
    assert weights["model_type"] == "llama"
    assert not any(k.startswith("aligntk_heads") for k in load_file(str(result.run_dir / "model" / "model.safetensors")))


def test_several_optimizer_steps_per_rollout_batch(tiny: dict[str, Any]) -> None:
    recipe = _ppo_recipe(tiny, iterations=3)
    result = run_recipe(recipe, ["train.max_steps=6", "train.batch_size=4"], plugins={"ones": OnesPlugin()})
    records = read_metrics(result.run_dir)
    # Steps 1-3 train on one batch of rollouts, 4-6 on the next: same rewards and lengths within a block.
    for a, b in ((0, 1), (1, 2), (3, 4), (4, 5)):
        assert records[a]["reward"] == records[b]["reward"]
        assert records[a]["completion_length"] == records[b]["completion_length"]
    assert records[0]["clip_fraction"] == records[3]["clip_fraction"] == 0.0  # ratio 1 on a block's first step
    # The policy moved off them within a block. (In the first block every reward is 1 and the
    # value head starts at 0, so the whitened advantages can all be 0: no step, no clipping.)
    assert any(records[i]["clip_fraction"] > 0.0 for i in (1, 2, 4, 5))


def _full_and_resumed(recipe: dict[str, Any], tmp_path: Path) -> tuple[Any, Any]:
    """An uninterrupted 6-step run, and one interrupted after step 5 and resumed from step 4."""
    from aligntk.testing import InterruptAt

    common = ["train.max_steps=6", "train.batch_size=4", "train.save_every=2"]
    plugins = {"ones": OnesPlugin()}
    full = run_recipe(recipe, [*common, f"output_dir={tmp_path / 'full'}"], plugins=plugins)
    broken = tmp_path / "broken"
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, [*common, f"output_dir={broken}"], plugins={**plugins, "crash": InterruptAt(5)})
    return full, run_recipe(recipe, [*common, f"output_dir={broken}"], plugins=plugins, resume=True)


def test_ppo_resume_ends_with_the_same_weights_and_value_head(tiny: dict[str, Any], tmp_path: Path) -> None:
    full, resumed = _full_and_resumed(_ppo_recipe(tiny, iterations=2), tmp_path)
    assert_same_weights(full.run_dir, resumed.run_dir)
    a = load_file(str(full.run_dir / "model" / "heads.safetensors"))
    b = load_file(str(resumed.run_dir / "model" / "heads.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_inside_a_rollout_block_trains_on_the_same_rollouts(tiny: dict[str, Any], tmp_path: Path) -> None:
    # iterations 3: steps 4, 5, 6 share one block of rollouts; the step-4 checkpoint is inside
    # it. Re-sampling at step 5 with the resumed policy would give other rollouts and weights.
    full, resumed = _full_and_resumed(_ppo_recipe(tiny, iterations=3), tmp_path)
    state = torch.load(resumed.run_dir / "checkpoints" / "step-00000004" / "state.pt", weights_only=True)
    assert state["data"]["block"] == 1 and len(state["data"]["batches"]) == 1  # the block of steps 4-6
    assert_same_weights(full.run_dir, resumed.run_dir)
    tail = {r["step"]: r for r in read_metrics(resumed.run_dir)}
    for r in read_metrics(full.run_dir):
        assert tail[r["step"]]["loss"] == r["loss"]


def test_value_estimators_need_the_value_head_and_ppo_needs_returns(tiny: dict[str, Any]) -> None:
    recipe = _ppo_recipe(tiny)
    with pytest.raises(AligntkError, match="advantage 'gae' needs a learned value: use the ppo loss"):
        run_recipe({**recipe, "loss": {"name": "grpo"}}, ["train.max_steps=1"], plugins={"ones": OnesPlugin()})
    data = {**recipe["data"], "advantage": "group"}
    with pytest.raises(AligntkError, match="set the data's advantage to a value-based estimator"):
        run_recipe({**recipe, "data": data}, ["train.max_steps=1"], plugins={"ones": OnesPlugin()}, overwrite=True)


def test_grpo_options_pick_registered_components() -> None:
    config = GRPOConfig(kl="k1", aggregation={"name": "fixed_length", "tokens": 8})
    assert config.kl.name == "k1" and config.aggregation.config.tokens == 8
    with pytest.raises(ValueError, match="unknown aggregation 'tokens', did you mean 'token'"):
        GRPOConfig(aggregation="tokens")


class RewardAsAdvantage:
    """A third-party estimator (the docs' example): REINFORCE without a baseline."""

    class Config(ComponentConfig):
        scale: float = 1.0

    needs_values = False

    def __init__(self, config: Any):
        self.config = config

    def __call__(self, scored: Scored) -> tuple[torch.Tensor, None]:
        return self.config.scale * scored.rewards[:, None] * scored.mask, None


class ReinforcePlugin:
    @hookimpl
    def aligntk_register_parts(self, register: Any) -> None:
        register("advantage", "reinforce", RewardAsAdvantage)


def test_a_plugin_registered_estimator_is_chosen_by_name(tiny: dict[str, Any]) -> None:
    recipe = _ppo_recipe(tiny, advantage={"name": "reinforce", "scale": 0.5})
    recipe["loss"] = {"name": "grpo", "beta": 0.0}
    plugins = {"ones": OnesPlugin(), "reinforce": ReinforcePlugin()}
    result = run_recipe(recipe, ["train.max_steps=2", "train.batch_size=2"], plugins=plugins)
    saved = yaml.safe_load((result.run_dir / "recipe.yaml").read_text())
    assert saved["data"]["advantage"] == {"name": "reinforce", "scale": 0.5}
    with pytest.raises(RecipeError, match=r"data\.advantage: unknown advantage 'reinforce'"):
        run_recipe(recipe, ["train.max_steps=1"], plugins={"ones": OnesPlugin()}, overwrite=True)
