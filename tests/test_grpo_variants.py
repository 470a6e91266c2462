"""GRPO variants against TRL 1.16's own code on the same tensors.

The loss: ``GRPOTrainer._compute_loss`` is called unbound on a stand-in ``self`` that holds
the attributes it reads, its ``_get_per_token_logps_and_entropies`` returning log-probs and
entropies computed (float64) from one leaf logits tensor; aligntk's ``GRPOLoss.policy_terms``
gets the same tensors. Value and gradient with respect to the logits must agree.

The advantages: the lines of ``_generate_and_score_completions`` that turn rewards into
advantages (TRL's ``scale_rewards``) are read from TRL's installed source and run as they are.
"""

from __future__ import annotations

import dataclasses
import inspect
import textwrap
import types
from collections import defaultdict
from typing import Any

import pytest
import torch

from aligntk import RecipeError, load_plugins
from aligntk.recipe import validate_recipe

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
from trl import GRPOConfig as TRLConfig  # noqa: E402
from trl.trainer.utils import nanstd  # noqa: E402

from aligntk_rl import GRPOLoss, Scored  # noqa: E402
from aligntk_rl.estimators import GroupAdvantage, GroupConfig, group_advantages  # noqa: E402
from aligntk_rl.loss import PolicyOutputs  # noqa: E402
from aligntk_rl.variants import importance_ratio, token_entropy, top_entropy_mask  # noqa: E402

GRPOTrainer = trl_grpo.GRPOTrainer
B, TC, V, MAX_LEN = 6, 5, 7, 5
LENGTHS = [5, 3, 4, 2, 5, 1]


class _Accelerator:
    """What ``_compute_loss`` and ``get_high_entropy_mask`` ask of accelerate, for one process."""

    num_processes = 1
    sync_gradients = True

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def reduce(self, x: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return x

    def pad_across_processes(self, x: torch.Tensor, dim: int = 0, pad_index: float = 0) -> torch.Tensor:
        return x


def _tensors(seed: int = 0, lengths: list[int] = LENGTHS) -> dict[str, torch.Tensor]:
    """One rollout batch in TRL's layout (completion only, ``[B, TC]``), float64."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, TC, V, generator=g, dtype=torch.float64).requires_grad_(True)
    ids = torch.randint(0, V, (B, TC), generator=g)
    mask = (torch.arange(TC)[None] < torch.tensor(lengths)[:, None]).long()
    with torch.no_grad():
        logps = logits.log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
    # Far enough from the current policy that some ratios leave [0.8, 1.2] and [0, 1.5].
    old = (logps + 0.4 * torch.randn(B, TC, generator=g, dtype=torch.float64)) * mask
    ref = (logps + 0.3 * torch.randn(B, TC, generator=g, dtype=torch.float64)) * mask
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return {"logits": logits, "ids": ids, "mask": mask, "old": old, "ref": ref, "adv": adv}


def _logps_entropy(t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """What TRL's model forward returns (``log_probs``, ``entropy``), differentiable, from the leaf logits."""
    logps = t["logits"].log_softmax(-1)
    picked = logps.gather(-1, t["ids"][..., None]).squeeze(-1)
    return picked, -(logps.exp() * logps).sum(-1)


def trl_loss(t: dict[str, torch.Tensor], **args: Any) -> torch.Tensor:
    """TRL 1.16's ``_compute_loss`` on these tensors, with TRL's defaults for what ``args`` leaves out."""
    defaults = {f.name: f.default for f in dataclasses.fields(TRLConfig) if f.default is not dataclasses.MISSING}
    a = {k: defaults[k] for k in ("loss_type", "beta", "epsilon", "epsilon_high", "delta", "importance_sampling_level",
                                  "use_bias_correction_kl", "sapo_temperature_pos", "sapo_temperature_neg",
                                  "top_entropy_quantile", "entropy_coef", "use_adaptive_entropy")}
    a.update(args, steps_per_generation=1)
    logps, entropy = _logps_entropy(t)
    me = types.SimpleNamespace(
        args=types.SimpleNamespace(**a),
        loss_type=a["loss_type"], beta=a["beta"], epsilon_low=a["epsilon"],
        epsilon_high=a["epsilon_high"] if a["epsilon_high"] is not None else a["epsilon"],
        importance_sampling_level=a["importance_sampling_level"], top_entropy_quantile=a["top_entropy_quantile"],
        entropy_coef=a["entropy_coef"], use_adaptive_entropy=a["use_adaptive_entropy"],
        _entropy_bonus_enabled=a["entropy_coef"] != 0.0 or a["use_adaptive_entropy"],
        off_policy_mask_threshold=None, use_vllm=False, vllm_importance_sampling_correction=False,
        aux_loss_enabled=False, model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=MAX_LEN, accelerator=_Accelerator(),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *_, **__: (logps, entropy, None),
    )
    me.get_high_entropy_mask = types.MethodType(GRPOTrainer.get_high_entropy_mask, me)
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": t["ids"], "completion_mask": t["mask"], "advantages": t["adv"],
        "old_per_token_logps": t["old"], "ref_per_token_logps": t["ref"], "num_items_in_batch": t["mask"].sum(),
    }
    return GRPOTrainer._compute_loss(me, None, inputs)


def aligntk_loss(t: dict[str, torch.Tensor], **options: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """aligntk's ``grpo`` loss (sum / count) on the same tensors, one prompt token before each completion."""
    logps, entropy = _logps_entropy(t)
    pad = lambda x: torch.nn.functional.pad(x, (1, 0))  # noqa: E731
    mask = t["mask"]
    labels = pad(torch.where(mask.bool(), t["ids"], -100))
    labels[:, 0] = -100
    batch = {
        "labels": labels, "old_logps": pad(t["old"]), "ref_logps": pad(t["ref"]),
        "advantages": t["adv"][:, None] * pad(mask).double(), "rewards": torch.zeros(B),
    }
    loss = GRPOLoss(GRPOLoss.Config(**{"beta": 0.0, **options}))  # TRL's default beta, 0
    out = PolicyOutputs(logps=pad(logps) * pad(mask), entropy=pad(entropy) * pad(mask))
    total, metrics = loss.policy_terms(out, batch)
    return total / loss.count(batch), metrics


# TRL's loss_type and options -> aligntk's grpo options.
CASES = {
    "grpo": ({"loss_type": "grpo"}, {"aggregation": "sequence"}),
    "bnpo": ({"loss_type": "bnpo"}, {"aggregation": "token"}),
    "dapo": ({"loss_type": "dapo"}, {"aggregation": "token"}),
    "dapo, epsilon_high 0.28": ({"loss_type": "dapo", "epsilon_high": 0.28}, {"epsilon_high": 0.28}),
    "dr_grpo": ({"loss_type": "dr_grpo"}, {"aggregation": {"name": "fixed_length", "tokens": MAX_LEN}}),
    "gspo (grpo, sequence ratio)": (
        {"loss_type": "grpo", "importance_sampling_level": "sequence", "epsilon": 3e-4, "epsilon_high": 4e-4},
        {"aggregation": "sequence", "importance_sampling": "sequence", "epsilon": 3e-4, "epsilon_high": 4e-4},
    ),
    "gspo, beta and bias-corrected kl": (
        {"loss_type": "grpo", "importance_sampling_level": "sequence", "beta": 0.1},
        {"aggregation": "sequence", "importance_sampling": "sequence", "beta": 0.1, "kl_bias_correction": True},
    ),
    "cispo": ({"loss_type": "cispo", "epsilon_high": 1.3}, {"surrogate": {"name": "cispo", "epsilon_max": 1.3}}),
    "sapo": ({"loss_type": "sapo"}, {"aggregation": "sequence", "surrogate": "sapo"}),
    "sapo, temperatures": (
        {"loss_type": "sapo", "sapo_temperature_pos": 0.5, "sapo_temperature_neg": 2.0},
        {"aggregation": "sequence", "surrogate": {"name": "sapo", "temperature_pos": 0.5, "temperature_neg": 2.0}},
    ),
    "beta, k3 with TRL's bias correction": (
        {"loss_type": "dapo", "beta": 0.2}, {"beta": 0.2, "kl": "k3", "kl_bias_correction": True},
    ),
    "beta, k3 without bias correction": (
        {"loss_type": "grpo", "beta": 0.2, "use_bias_correction_kl": False},
        {"aggregation": "sequence", "beta": 0.2, "kl": "k3"},
    ),
    "two-sided clipping delta": ({"loss_type": "dapo", "delta": 1.3}, {"surrogate": {"name": "clip", "delta": 1.3}}),
    "entropy bonus": ({"loss_type": "dapo", "entropy_coef": 0.05}, {"entropy_coef": 0.05}),
    "top-entropy tokens": ({"loss_type": "dapo", "top_entropy_quantile": 0.3}, {"top_entropy_quantile": 0.3}),
    "top-entropy tokens, grpo": (
        {"loss_type": "grpo", "top_entropy_quantile": 0.15}, {"aggregation": "sequence", "top_entropy_quantile": 0.15},
    ),
    "everything on dapo": (
        {"loss_type": "dapo", "beta": 0.1, "delta": 1.5, "epsilon_high": 0.28, "top_entropy_quantile": 0.5},
        {"beta": 0.1, "kl_bias_correction": True, "surrogate": {"name": "clip", "delta": 1.5}, "epsilon_high": 0.28,
         "top_entropy_quantile": 0.5},
    ),
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", list(CASES))
def test_loss_value_and_gradient_equal_trls(case: str, seed: int) -> None:
    trl_args, options = CASES[case]
    t = _tensors(seed)
    expected = trl_loss(t, **trl_args)
    (expected_grad,) = torch.autograd.grad(expected, t["logits"])
    got, _ = aligntk_loss(t, **options)
    (got_grad,) = torch.autograd.grad(got, t["logits"])
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected.detach(), atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(got_grad, expected_grad, atol=1e-10, rtol=1e-9)
    assert expected_grad.abs().sum() > 0


def test_the_cases_exercise_clipping_capping_and_masking() -> None:
    """The tensors are off-policy enough that each switch changes the result."""
    t = _tensors(0)
    base, metrics = aligntk_loss(t)
    assert 0 < (metrics["clip_fraction"][0] / metrics["clip_fraction"][1]).item() < 1
    for options in ({"surrogate": {"name": "clip", "delta": 1.3}}, {"top_entropy_quantile": 0.3},
                    {"entropy_coef": 0.05}, {"importance_sampling": "sequence"}):
        assert not torch.isclose(aligntk_loss(t, **options)[0], base), options
    beta, _ = aligntk_loss(t, beta=0.2)
    assert not torch.isclose(aligntk_loss(t, beta=0.2, kl_bias_correction=True)[0], beta)


def test_entropy_bonus_under_sequence_aggregation_is_trls_with_equal_lengths() -> None:
    """aligntk reduces the bonus with the loss's aggregation (exact over micro-batches); TRL always
    takes the token mean. The two agree when every completion has the same length."""
    t = _tensors(0, lengths=[4] * B)
    expected = trl_loss(t, loss_type="grpo", entropy_coef=0.1)
    got, _ = aligntk_loss(t, aggregation="sequence", entropy_coef=0.1)
    torch.testing.assert_close(got, expected.detach(), atol=1e-10, rtol=1e-9)
    t = _tensors(0)
    unequal, _ = aligntk_loss(t, aggregation="sequence", entropy_coef=0.1)
    assert not torch.isclose(unequal, trl_loss(t, loss_type="grpo", entropy_coef=0.1).detach())


def test_pieces_by_hand() -> None:
    logps = torch.tensor([[0.0, -1.0, -2.0, 0.0], [0.0, -1.0, 0.0, 0.0]])
    old = torch.tensor([[0.0, -1.5, -1.0, 0.0], [0.0, -0.5, 0.0, 0.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    seq = importance_ratio(logps, old, mask, "sequence")
    torch.testing.assert_close(seq, torch.tensor([[torch.e ** ((0.5 - 1.0) / 2)], [torch.e ** -0.5]]))
    entropy = torch.tensor([[9.0, 0.1, 0.5, 9.0], [9.0, 0.3, 9.0, 9.0]])
    # quantile 0.5 of (0.1, 0.5, 0.3) is 0.3: keep 0.5 and 0.3
    assert top_entropy_mask(entropy, mask, 0.5).tolist() == [[False, False, True, False], [False, True, False, False]]
    assert top_entropy_mask(entropy, mask, 0.0).tolist() == [[False, False, True, False], [False, False, False, False]]
    logits = torch.zeros(1, 3, 4)
    labels = torch.tensor([[-100, 1, -100]])
    torch.testing.assert_close(token_entropy(logits, labels), torch.tensor([[0.0, torch.log(torch.tensor(4.0)), 0.0]]))


# --------------------------------------------------------------------------------------
# Advantages: TRL's scale_rewards
# --------------------------------------------------------------------------------------


def trl_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str) -> torch.Tensor:
    """The reward-to-advantage lines of TRL's ``_generate_and_score_completions``, run from its source."""
    source = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    start = source.index('if self.multi_objective_aggregation == "sum_then_normalize":')
    end = source.index('elif self.multi_objective_aggregation == "normalize_then_sum":')
    block = textwrap.dedent(" " * (len(source[:start]) - len(source[:start].rstrip(" "))) + source[start:end])
    me = types.SimpleNamespace(
        multi_objective_aggregation="sum_then_normalize", scale_rewards=scale_rewards, reward_weights=torch.ones(1)
    )
    scope = {"self": me, "torch": torch, "nanstd": nanstd, "device": "cpu", "num_generations": num_generations,
             "rewards_per_func": rewards[:, None], "unscorable_mask": torch.zeros(len(rewards), dtype=torch.bool)}
    exec(compile(block, "trl-advantages", "exec"), scope)  # noqa: S102 - TRL's own lines
    return scope["advantages"]


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("g", [1, 4])
def test_advantages_equal_trls(scale: str, g: int) -> None:
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.5, 2.0, 2.0, 2.0, 2.0, -1.0, 3.0, 0.25, 0.0], dtype=torch.float64)
    expected = trl_advantages(rewards, g, scale)
    mask = torch.ones(len(rewards), 3, dtype=torch.float64)
    got, _ = GroupAdvantage(GroupConfig(scale=scale))(Scored(rewards=rewards, group_size=g, mask=mask, logps=mask))
    # TRL's nanstd takes Bessel's factor count / (count - 1) as a float32 tensor: 1.5e-8 relative in float64.
    torch.testing.assert_close(got, expected[:, None].expand_as(got), atol=1e-7, rtol=1e-7)
    plain = group_advantages(rewards.view(-1, g), scale=scale).reshape(-1)
    torch.testing.assert_close(plain, expected, atol=1e-7, rtol=1e-7)
    if scale != "none" and g > 1:
        assert not torch.allclose(plain, group_advantages(rewards.view(-1, g), scale="none").reshape(-1))


def test_bool_scale_is_trls_alias_and_a_wrong_value_names_the_key_and_choices(tiny: dict[str, Any]) -> None:
    assert GroupConfig(scale=True).scale == "group" and GroupConfig(scale=False).scale == "none"
    registry = load_plugins().registry
    from pathlib import Path

    folder = Path(tiny["data"]["path"]).parent
    recipe = {
        **tiny,
        "data": {"name": "rollout", "path": str(folder / "train.jsonl"), "advantage": {"name": "group", "scale": "bach"}},
        "loss": {"name": "grpo"},
        "rewards": [{"name": "exact_answer"}],
    }
    with pytest.raises(RecipeError, match=r"data\.advantage: advantage 'group': scale: .*'group', 'batch' or 'none'"):
        validate_recipe(recipe, registry)
    recipe["data"]["advantage"] = "group"
    for key, value, pattern in (
        ("importance_sampling", "seq", r"loss\.importance_sampling: .*'token' or 'sequence'"),
        ("surrogate", "gspo", r"loss\.surrogate: unknown surrogate 'gspo'.*\(installed: cispo, clip, sapo\)"),
        ("surrogate", {"name": "clip", "delta": 0.9}, r"loss\.surrogate: surrogate 'clip': delta: .*greater than 1"),
        ("top_entropy_quantile", 1.5, r"loss\.top_entropy_quantile: .*less than or equal to 1"),
    ):
        with pytest.raises(RecipeError, match=pattern):
            validate_recipe({**recipe, "loss": {"name": "grpo", key: value}}, registry)
    dumped = validate_recipe(recipe, registry).dump()
    assert dumped["data"]["advantage"] == {"name": "group", "scale": "group", "eps": 1e-4}
    assert dumped["loss"][0]["surrogate"] == {"name": "clip", "delta": None}


def test_trl_defaults_are_the_ones_docs_rl_md_names() -> None:
    """TRL 1.16's defaults as docs/rl.md lists them next to aligntk's (a TRL upgrade that moves one fails here)."""
    trl = {f.name: f.default for f in dataclasses.fields(TRLConfig) if f.default is not dataclasses.MISSING}
    assert {k: trl[k] for k in ("loss_type", "beta", "use_bias_correction_kl", "scale_rewards", "epsilon",
                                "epsilon_high", "delta", "importance_sampling_level", "top_entropy_quantile",
                                "entropy_coef", "sapo_temperature_pos", "sapo_temperature_neg")} == {
        "loss_type": "dapo", "beta": 0.0, "use_bias_correction_kl": True, "scale_rewards": "group", "epsilon": 0.2,
        "epsilon_high": None, "delta": None, "importance_sampling_level": "token", "top_entropy_quantile": 1.0,
        "entropy_coef": 0.0, "sapo_temperature_pos": 1.0, "sapo_temperature_neg": 1.05,
    }
    ours = GRPOLoss.Config()
    assert (ours.aggregation.name, ours.beta, ours.kl_bias_correction, ours.surrogate.name) == ("token", 0.04, False, "clip")
    assert (ours.epsilon, ours.importance_sampling, ours.top_entropy_quantile, ours.entropy_coef) == (0.2, "token", 1.0, 0.0)
    assert GroupConfig().scale == "group"


# --------------------------------------------------------------------------------------
# Through a model: the loss contract, and the entropy bonus's gradient
# --------------------------------------------------------------------------------------


def _model_batch(seed: int = 0) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A tiny policy and a rollout batch for it: old log-probs off the current policy, per-token advantages."""
    from aligntk import pad_tokens
    from aligntk.testing import char_tokenizer, tiny_model

    tok = char_tokenizer()
    model = tiny_model(tok, seed=seed)
    rows = [("1+1=", "2"), ("3+4=", "71"), ("9+9=", "18"), ("2+2=", "4444")]
    ids = [tok(p)["input_ids"] + tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for p, c in rows]
    labels = [[-100] * len(tok(p)["input_ids"]) + i[len(tok(p)["input_ids"]):] for (p, _), i in zip(rows, ids)]
    batch = pad_tokens(ids, tok.pad_token_id, labels)
    mask = (batch["labels"] != -100).float()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logps = torch.nn.functional.pad(
            logits[:, :-1].float().log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1), (1, 0)
        )
    batch["old_logps"] = (logps + 0.3 * torch.randn(logps.shape, generator=g)) * mask
    batch["ref_logps"] = (logps + 0.2 * torch.randn(logps.shape, generator=g)) * mask
    batch["advantages"] = torch.tensor([1.5, -0.5, 0.25, -1.0])[:, None] * mask
    batch["rewards"] = torch.tensor([1.0, 0.0, 0.5, 0.0])
    return model, batch


@pytest.mark.parametrize("options", [
    {"importance_sampling": "sequence", "aggregation": "sequence", "beta": 0.1, "kl_bias_correction": True},
    {"surrogate": {"name": "cispo", "epsilon_max": 1.1}},
    {"surrogate": "sapo", "aggregation": {"name": "fixed_length", "tokens": 4}},
    {"surrogate": {"name": "clip", "delta": 1.2}, "entropy_coef": 0.05},
])
def test_variants_keep_the_loss_contract(options: dict[str, Any]) -> None:
    from aligntk import Models
    from aligntk.testing import check_loss_contract

    model, batch = _model_batch()
    checks = check_loss_contract(GRPOLoss(GRPOLoss.Config(**options)), Models({"policy": model}), batch)
    assert "ignored tokens get no gradient" in checks


def test_entropy_bonus_gradient_through_the_model_is_the_hand_computed_one() -> None:
    from aligntk import Models

    model, batch = _model_batch()
    coef = 0.1
    out = GRPOLoss(GRPOLoss.Config(beta=0.0, entropy_coef=coef))(Models({"policy": model}), batch)
    (out.sum / out.count).backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    mask = (batch["labels"] != -100).float()[:, 1:]
    logps_all = logits.log_softmax(-1)
    logps = logps_all.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    entropy = -(logps_all.exp() * logps_all).sum(-1)
    ratio = torch.exp(logps - batch["old_logps"][:, 1:])
    adv = batch["advantages"][:, 1:]
    surrogate = -torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
    ((((surrogate - coef * entropy) * mask).sum()) / mask.sum()).backward()
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-4)
    assert out.metrics["entropy"][0].item() == pytest.approx((entropy * mask).sum().item(), rel=1e-5)
