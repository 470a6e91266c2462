"""Preference losses: hand-computed values, TRL 1.16 parity, and the loss contract.

TRL parity is checked against the code TRL runs, called with a stub ``self``:

* ``trl.DPOTrainer._compute_loss`` for ``sigmoid``, ``hinge``, ``ipo`` and ``robust`` (a fake
  model hands it per-token log-probs; reference log-probs go in as precomputed inputs).
  TRL's DPO ``sigmoid`` ignores ``label_smoothing``, so conservative DPO is compared with
  ``CPOTrainer.cpo_loss`` (``sigmoid``) given the log-ratios, whose difference is DPO's.
* ``trl.experimental.cpo.CPOTrainer.cpo_loss`` (``simpo``) and ``CPOTrainer.get_batch_logps``
  for SimPO and for ``sequence_logps`` (sum and length average).
* ``trl.RewardTrainer.compute_loss`` for the Bradley–Terry loss, with and without a margin.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import aligntk_po

from aligntk import Models
from aligntk.testing import char_tokenizer, check_loss_contract, tiny_model
from aligntk_po.loss import DPOLoss, RewardModelLoss, SimPOLoss
from aligntk_po.losses import (
    bradley_terry_loss,
    implicit_rewards,
    label_counts,
    preference_loss,
    sequence_logps,
    simpo_loss,
)

# Three pairs: (policy chosen, policy rejected, ref chosen, ref rejected) sequence log-probs.
PC = [-5.0, -7.5, -2.0]
PR = [-6.0, -4.0, -9.0]
RC = [-5.5, -7.0, -3.0]
RR = [-5.0, -5.0, -8.0]
LEN_C = [3, 5, 2]
LEN_R = [4, 2, 6]


def t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def deltas() -> list[float]:
    return [(pc - rc) - (pr - rr) for pc, pr, rc, rr in zip(PC, PR, RC, RR)]


def dpo(loss_type: str, beta: float = 0.1, eps: float = 0.0, lengths: bool = False) -> torch.Tensor:
    extra = {"chosen_lengths": torch.tensor(LEN_C), "rejected_lengths": torch.tensor(LEN_R)} if lengths else {}
    return preference_loss(t(PC), t(PR), t(RC), t(RR), beta=beta, loss_type=loss_type, label_smoothing=eps, **extra)


# --------------------------------------------------------------------------------------
# Hand computations
# --------------------------------------------------------------------------------------


def test_sequence_logps_by_hand() -> None:
    logits = torch.tensor([[[0.0, 1.0, 2.0], [2.0, 0.0, 0.0], [0.5, 0.5, 0.0]]])  # [1, 3, 3]
    labels = torch.tensor([[-100, 0, 2]])
    # position 0 predicts label 0, position 1 predicts label 2; position 2 predicts nothing.
    expected = math.log(math.exp(0) / (1 + math.e + math.e**2)) + math.log(1 / (math.e**2 + 2))
    assert sequence_logps(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    assert label_counts(labels).tolist() == [2]


def test_sequence_logps_upcasts_and_ignores_padding() -> None:
    logits = torch.randn(2, 5, 7, dtype=torch.bfloat16)
    labels = torch.tensor([[-100, 1, 2, -100, -100], [-100, -100, 3, 4, 5]])
    out = sequence_logps(logits, labels)
    assert out.dtype == torch.float32
    logp = logits.float().log_softmax(-1)
    assert out[0].item() == pytest.approx((logp[0, 0, 1] + logp[0, 1, 2]).item(), rel=1e-6)
    assert out[1].item() == pytest.approx((logp[1, 1, 3] + logp[1, 2, 4] + logp[1, 3, 5]).item(), rel=1e-6)


def test_sigmoid_by_hand() -> None:
    expected = [-logsig(0.1 * d) for d in deltas()]
    assert dpo("sigmoid").tolist() == pytest.approx(expected, rel=1e-6)


def test_conservative_dpo_by_hand() -> None:
    eps = 0.2
    expected = [-(1 - eps) * logsig(0.5 * d) - eps * logsig(-0.5 * d) for d in deltas()]
    assert dpo("sigmoid", beta=0.5, eps=eps).tolist() == pytest.approx(expected, rel=1e-6)


def test_robust_by_hand() -> None:
    eps = 0.1
    expected = [(-(1 - eps) * logsig(0.5 * d) + eps * logsig(-0.5 * d)) / (1 - 2 * eps) for d in deltas()]
    assert dpo("robust", beta=0.5, eps=eps).tolist() == pytest.approx(expected, rel=1e-6)
    # Without label noise it is plain DPO.
    assert dpo("robust", beta=0.5).tolist() == pytest.approx(dpo("sigmoid", beta=0.5).tolist(), rel=1e-6)


def test_hinge_by_hand() -> None:
    expected = [max(0.0, 1 - 0.5 * d) for d in deltas()]
    assert dpo("hinge", beta=0.5).tolist() == pytest.approx(expected, rel=1e-6)
    assert min(expected) == 0.0 < max(expected)  # the data reach both sides of the hinge


def test_ipo_by_hand() -> None:
    beta = 0.5
    averaged = [
        (pc - rc) / lc - (pr - rr) / lr for pc, pr, rc, rr, lc, lr in zip(PC, PR, RC, RR, LEN_C, LEN_R)
    ]
    expected = [(d - 1 / (2 * beta)) ** 2 for d in averaged]
    assert dpo("ipo", beta=beta, lengths=True).tolist() == pytest.approx(expected, rel=1e-6)
    unnormalized = [(d - 1 / (2 * beta)) ** 2 for d in deltas()]
    assert dpo("ipo", beta=beta).tolist() == pytest.approx(unnormalized, rel=1e-6)


def test_implicit_rewards_by_hand() -> None:
    chosen, rejected = implicit_rewards(t(PC), t(PR), t(RC), t(RR), beta=0.1)
    assert chosen.tolist() == pytest.approx([0.1 * (a - b) for a, b in zip(PC, RC)], rel=1e-6)
    assert rejected.tolist() == pytest.approx([0.1 * (a - b) for a, b in zip(PR, RR)], rel=1e-6)


def test_simpo_by_hand() -> None:
    beta, gamma = 2.0, 0.5
    avg_c = [pc / n for pc, n in zip(PC, LEN_C)]
    avg_r = [pr / n for pr, n in zip(PR, LEN_R)]
    expected = [-logsig(beta * (c - r) - gamma) for c, r in zip(avg_c, avg_r)]
    assert simpo_loss(t(avg_c), t(avg_r), beta, gamma).tolist() == pytest.approx(expected, rel=1e-6)


def test_bradley_terry_by_hand() -> None:
    rc, rr, margin = [1.0, -0.5, 2.0], [0.0, 0.5, 2.5], [0.5, 0.0, 1.0]
    assert bradley_terry_loss(t(rc), t(rr)).tolist() == pytest.approx(
        [-logsig(a - b) for a, b in zip(rc, rr)], rel=1e-6
    )
    assert bradley_terry_loss(t(rc), t(rr), t(margin)).tolist() == pytest.approx(
        [-logsig(a - b - m) for a, b, m in zip(rc, rr, margin)], rel=1e-6
    )


def test_unknown_loss_type_and_bad_smoothing() -> None:
    with pytest.raises(ValueError, match="unknown loss_type"):
        dpo("kto")
    with pytest.raises(ValueError, match="label_smoothing < 0.5"):
        dpo("robust", eps=0.5)


# --------------------------------------------------------------------------------------
# TRL parity
# --------------------------------------------------------------------------------------


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather(x: torch.Tensor) -> torch.Tensor:
        return x

    gather_for_metrics = gather


def _random_pairs(seed: int, b: int = 4, width: int = 9) -> dict[str, torch.Tensor]:
    """Per-token log-probs ``[2B, T-1]`` (chosen rows first) with completion masks of random length."""
    g = torch.Generator().manual_seed(seed)
    completion_mask = torch.zeros(2 * b, width, dtype=torch.long)
    for row in range(2 * b):
        start = int(torch.randint(1, 4, (1,), generator=g))
        end = int(torch.randint(start + 1, width + 1, (1,), generator=g))
        completion_mask[row, start:end] = 1
    shift_mask = completion_mask[:, 1:]
    policy_tokens = -torch.rand(2 * b, width - 1, generator=g) * 3 * shift_mask
    ref_tokens = -torch.rand(2 * b, width - 1, generator=g) * 3 * shift_mask
    return {"completion_mask": completion_mask, "policy": policy_tokens, "ref": ref_tokens}


def _trl_dpo(pairs: dict[str, torch.Tensor], loss_type: str, beta: float, eps: float) -> torch.Tensor:
    from trl import DPOTrainer

    n = pairs["policy"].shape[0]
    outputs = SimpleNamespace(
        log_probs=pairs["policy"],
        entropy=torch.zeros_like(pairs["policy"]),
        mean_logits=torch.zeros_like(pairs["policy"]),
        is_top1=torch.zeros_like(pairs["policy"], dtype=torch.bool),
    )
    model = SimpleNamespace(training=True)
    stub = SimpleNamespace(
        model=model, accelerator=_Accelerator(), aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=eps, use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    ref_chosen, ref_rejected = pairs["ref"].sum(1).chunk(2)
    inputs = {
        "input_ids": torch.zeros_like(pairs["completion_mask"]),
        "attention_mask": torch.ones_like(pairs["completion_mask"]),
        "completion_mask": pairs["completion_mask"],
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    assert n % 2 == 0
    return DPOTrainer._compute_loss(stub, lambda **_: outputs, inputs, return_outputs=False)


@pytest.mark.parametrize(
    ("loss_type", "beta", "eps"),
    [("sigmoid", 0.1, 0.0), ("sigmoid", 0.7, 0.0), ("hinge", 0.5, 0.0), ("ipo", 0.3, 0.0), ("robust", 0.5, 0.2)],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_dpo_matches_trl(loss_type: str, beta: float, eps: float, seed: int) -> None:
    pairs = _random_pairs(seed)
    policy_chosen, policy_rejected = pairs["policy"].sum(1).chunk(2)
    ref_chosen, ref_rejected = pairs["ref"].sum(1).chunk(2)
    chosen_len, rejected_len = pairs["completion_mask"].sum(1).chunk(2)
    ours = preference_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta, loss_type=loss_type,
        label_smoothing=eps, chosen_lengths=chosen_len, rejected_lengths=rejected_len,
    )  # fmt: skip
    theirs = _trl_dpo(pairs, loss_type, beta, eps)
    assert ours.mean().item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-6)


def _cpo_stub(loss_type: str, beta: float, eps: float, gamma: float = 0.0) -> Any:
    return SimpleNamespace(
        alpha=0.0, beta=beta, label_smoothing=eps, loss_type=loss_type, simpo_gamma=gamma, accelerator=_Accelerator()
    )


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_conservative_dpo_matches_trl_cpo_sigmoid(eps: float) -> None:
    """TRL's DPO ``sigmoid`` has no label smoothing; CPO's ``sigmoid`` on log-ratios is cDPO."""
    from trl.experimental.cpo import CPOTrainer

    g = torch.Generator().manual_seed(3)
    pc, pr, rc, rr = (-torch.rand(5, generator=g) * 20 for _ in range(4))
    theirs, _, _ = CPOTrainer.cpo_loss(_cpo_stub("sigmoid", 0.4, eps), pc - rc, pr - rr)
    ours = preference_loss(pc, pr, rc, rr, beta=0.4, loss_type="sigmoid", label_smoothing=eps)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("beta", "gamma", "eps"), [(2.0, 0.5, 0.0), (2.5, 1.4, 0.0), (1.0, 0.3, 0.1)])
def test_simpo_matches_trl_cpo(beta: float, gamma: float, eps: float) -> None:
    from trl.experimental.cpo import CPOTrainer

    g = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 8, 11, generator=g)
    labels = torch.randint(0, 11, (6, 8), generator=g)
    labels[:, :3] = -100
    labels[1, 6:] = -100
    labels[4, 4:] = -100
    avg = sequence_logps(logits, labels) / label_counts(labels)
    trl_avg = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    torch.testing.assert_close(avg, trl_avg, rtol=1e-6, atol=1e-6)
    chosen, rejected = avg.chunk(2)
    theirs, _, _ = CPOTrainer.cpo_loss(_cpo_stub("simpo", beta, eps, gamma), chosen, rejected)
    torch.testing.assert_close(simpo_loss(chosen, rejected, beta, gamma, eps), theirs, rtol=1e-6, atol=1e-7)


def test_sequence_logps_matches_trl_get_batch_logps() -> None:
    from trl.experimental.cpo import CPOTrainer

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 10, 17, generator=g)
    labels = torch.randint(0, 17, (3, 10), generator=g)
    labels[:, :4] = -100
    labels[2, 7:] = -100
    torch.testing.assert_close(sequence_logps(logits, labels), CPOTrainer.get_batch_logps(logits, labels))


@pytest.mark.parametrize("with_margin", [False, True])
def test_bradley_terry_matches_trl_reward_trainer(with_margin: bool) -> None:
    from trl import RewardTrainer

    g = torch.Generator().manual_seed(6)
    scores = torch.randn(8, 1, generator=g)  # chosen rows first, as TRL's collator builds them
    margin = torch.rand(4, generator=g)
    stub = SimpleNamespace(
        model=SimpleNamespace(training=False), args=SimpleNamespace(center_rewards_coefficient=None),
        accelerator=_Accelerator(), _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    inputs: dict[str, Any] = {"input_ids": torch.zeros(8, 3, dtype=torch.long), "attention_mask": torch.ones(8, 3)}
    if with_margin:
        inputs["margin"] = margin
    theirs = RewardTrainer.compute_loss(stub, lambda **_: SimpleNamespace(logits=scores), inputs)
    r_chosen, r_rejected = scores.squeeze(-1).chunk(2)
    ours = bradley_terry_loss(r_chosen, r_rejected, margin if with_margin else None)
    assert ours.mean().item() == pytest.approx(theirs.item(), rel=1e-6)


# --------------------------------------------------------------------------------------
# Components: the loss contract
# --------------------------------------------------------------------------------------


def preference_batch(tokenizer: Any) -> dict[str, torch.Tensor]:
    """Four arithmetic pairs (right answer chosen), collated by the ``preference`` data."""
    from aligntk_po.data import PreferenceData

    rows = [("1+2=", "3", "4"), ("12+30=", "42", "41"), ("5+5=", "10", "9"), ("7+8=", "15", "16")]
    data = PreferenceData.__new__(PreferenceData)  # collate needs only the pad token
    data.pad_token_id = tokenizer.pad_token_id
    examples = []
    for prompt, chosen, rejected in rows:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        example: dict[str, Any] = {"margin": 0.5}
        for side, text in (("chosen", chosen), ("rejected", rejected)):
            c = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            example[f"{side}_input_ids"] = p + c
            example[f"{side}_labels"] = [-100] * len(p) + c
        examples.append(example)
    return data.collate(examples)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
def test_dpo_component_contract(loss_type: str) -> None:
    tok = char_tokenizer()
    policy = tiny_model(tok)
    from aligntk.models import frozen_copy

    reference = frozen_copy(tiny_model(tok, seed=1))
    loss = DPOLoss(DPOLoss.Config(loss_type=loss_type, label_smoothing=0.1 if loss_type == "robust" else 0.0))
    checks = check_loss_contract(
        loss,
        Models({"policy": policy, "reference": reference}),
        preference_batch(tok),
        label_fields=("chosen_labels", "rejected_labels"),
    )
    assert "micro-batch split gives the same sum and count" in checks
    assert "ignored tokens get no gradient" in checks


def test_dpo_component_value_and_metrics() -> None:
    tok = char_tokenizer()
    policy, reference = tiny_model(tok), tiny_model(tok, seed=1)
    batch = preference_batch(tok)
    loss = DPOLoss(DPOLoss.Config(beta=0.2, nll_weight=0.5))
    with torch.no_grad():
        out = loss(Models({"policy": policy, "reference": reference}), batch)

        def logps(model: torch.nn.Module, side: str) -> torch.Tensor:
            logits = model(input_ids=batch[f"{side}_input_ids"], attention_mask=batch[f"{side}_attention_mask"]).logits
            return sequence_logps(logits, batch[f"{side}_labels"])

        pc, pr = logps(policy, "chosen"), logps(policy, "rejected")
        rc, rr = logps(reference, "chosen"), logps(reference, "rejected")
    delta = (pc - rc) - (pr - rr)
    nll = -pc / label_counts(batch["chosen_labels"])
    expected = (-F.logsigmoid(0.2 * delta) + 0.5 * nll).sum()
    assert out.count.item() == 4
    torch.testing.assert_close(out.sum, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.metrics["rewards/margin"], 0.2 * delta.sum(), rtol=1e-4, atol=1e-5)
    assert out.metrics["rewards/accuracy"].item() == (delta > 0).sum().item()


def test_dpo_starts_at_log2_when_policy_is_reference() -> None:
    tok = char_tokenizer()
    policy = tiny_model(tok)
    from aligntk.models import frozen_copy

    out = DPOLoss(DPOLoss.Config())(Models({"policy": policy, "reference": frozen_copy(policy)}), preference_batch(tok))
    assert (out.sum / out.count).item() == pytest.approx(math.log(2), rel=1e-5)
    assert out.metrics["rewards/accuracy"].item() == 0.0


def test_simpo_component_contract() -> None:
    tok = char_tokenizer()
    loss = SimPOLoss(SimPOLoss.Config(nll_weight=0.1))
    check_loss_contract(loss, Models({"policy": tiny_model(tok)}), preference_batch(tok))


def test_reward_model_component_contract_and_value() -> None:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from aligntk.testing import TINY_LLAMA

    tok = char_tokenizer()
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        **{**TINY_LLAMA, "vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "num_labels": 1}
    )
    model = AutoModelForSequenceClassification.from_config(config)
    batch = preference_batch(tok)
    loss = RewardModelLoss(RewardModelLoss.Config())
    check_loss_contract(loss, Models({"policy": model}), batch)
    with torch.no_grad():
        out = loss(Models({"policy": model}), batch)
        r_c = model(input_ids=batch["chosen_input_ids"], attention_mask=batch["chosen_attention_mask"]).logits[:, 0]
        r_r = model(input_ids=batch["rejected_input_ids"], attention_mask=batch["rejected_attention_mask"]).logits[:, 0]
    torch.testing.assert_close(out.sum, (-F.logsigmoid(r_c - r_r - 0.5)).sum(), rtol=1e-4, atol=1e-5)
    assert out.metrics["accuracy"].item() == (r_c > r_r).sum().item()


def test_reward_model_loss_rejects_a_causal_lm() -> None:
    tok = char_tokenizer()
    with pytest.raises(ValueError, match="sequence_classification"):
        RewardModelLoss(RewardModelLoss.Config())(Models({"policy": tiny_model(tok)}), preference_batch(tok))


def test_plugin_registers_its_components() -> None:
    from aligntk import load_plugins

    # aligntk_po is installed through its entry point; passing it again as an extra would be
    # refused as a second plugin named 'po', so the installed one is what is checked.
    registered = load_plugins().registry.by_plugin("po")
    assert {(r.kind, r.name): r.cls for r in registered} == {
        ("data", "preference"): aligntk_po.PreferenceData,
        ("loss", "dpo"): aligntk_po.DPOLoss,
        ("loss", "simpo"): aligntk_po.SimPOLoss,
        ("loss", "reward_model"): aligntk_po.RewardModelLoss,
        ("data", "unpaired_preference"): aligntk_po.UnpairedPreferenceData,
        ("loss", "cpo"): aligntk_po.CPOLoss,
        ("loss", "orpo"): aligntk_po.ORPOLoss,
        ("loss", "kto"): aligntk_po.KTOLoss,
        ("loss", "bco"): aligntk_po.BCOLoss,
    }


@pytest.mark.parametrize("name", ["dpo", "simpo"])
def test_prompt_and_padding_get_no_gradient(name: str) -> None:
    """The harness checks this only for a ``labels`` field; here for ``chosen_``/``rejected_labels``."""
    tok = char_tokenizer()
    policy = tiny_model(tok)
    from aligntk.models import frozen_copy

    models = Models({"policy": policy, "reference": frozen_copy(tiny_model(tok, seed=1))})
    loss = DPOLoss(DPOLoss.Config()) if name == "dpo" else SimPOLoss(SimPOLoss.Config())
    batch = preference_batch(tok)
    captured: list[torch.Tensor] = []

    def keep(_module: Any, _args: Any, output: Any) -> None:
        output.logits.retain_grad()
        captured.append(output.logits)

    handle = policy.register_forward_hook(keep)
    try:
        loss(models, batch).sum.backward()
    finally:
        handle.remove()
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    ignored = torch.ones(labels.shape, dtype=torch.bool)
    ignored[:, :-1] = labels[:, 1:] == -100  # position t predicts label t + 1
    grad = captured[0].grad
    assert grad[ignored].abs().max().item() == 0.0
    assert grad[~ignored].abs().sum().item() > 0.0
