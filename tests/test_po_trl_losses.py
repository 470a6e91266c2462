"""TRL 1.16 parity of the DPO loss types, MPO, CPO and ORPO: value and gradient.

Two levels, both against the code TRL runs (called with a stub ``self``, as tests/test_po_losses.py does):

* pure functions in float64: a leaf tensor of per-token log-probs goes through TRL's
  ``DPOTrainer._compute_loss`` (a fake model returns it) and through
  ``aligntk_po.losses.preference_loss``; loss and gradient must agree to 1e-10. CPO's
  ``cpo_loss`` and ORPO's ``odds_ratio_loss`` likewise on sequence log-probs.
* components in float32 on one tiny Llama: aligntk's ``dpo``, ``cpo`` and ``orpo`` components and
  TRL's loss code (``DPOTrainer._compute_loss``, ``CPOTrainer.get_batch_loss_metrics``,
  ``ORPOTrainer.get_batch_loss_metrics``) run the same model on the same batch; the loss and
  every parameter's gradient must agree. MPO (several loss types with weights) is the
  recipe's list of ``dpo`` losses combined as the engine does (``sum_i w_i sum_i / count_i``).
"""

from __future__ import annotations

import random
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from aligntk import Models, logps_from_logits
from aligntk.models import frozen_copy
from aligntk.testing import char_tokenizer, check_loss_contract, tiny_model
from aligntk_po.cpo import CPOLoss, ORPOLoss
from aligntk_po.data import PreferenceData
from aligntk_po.loss import DPOLoss
from aligntk_po.losses import PAIR_LOSS_TYPES, cpo_loss, odds_ratio_loss, preference_loss


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather(x: torch.Tensor) -> torch.Tensor:
        return x

    gather_for_metrics = gather


def _outputs(log_probs: torch.Tensor) -> SimpleNamespace:
    zeros = torch.zeros_like(log_probs.detach())
    return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def _dpo_stub(types: list[str], weights: list[float], beta: float, eps: float, **extra: Any) -> SimpleNamespace:
    return SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_Accelerator(), aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type=extra.get("f_divergence_type", "reverse_kl"),
        f_alpha_divergence_coef=extra.get("f_alpha_divergence_coef", 0.5), loss_types=types, loss_weights=weights,
        beta=beta, label_smoothing=eps, use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1,
        args=SimpleNamespace(discopop_tau=extra.get("discopop_tau", 0.05), gradient_checkpointing_kwargs=None),
    )  # fmt: skip


#: (loss_type, beta, label_smoothing, extra dpo options): every TRL 1.16 DPO type, defaults where TRL has them.
CASES: list[tuple[str, float, float, dict[str, Any]]] = [
    ("sigmoid", 0.1, 0.0, {}),
    ("hinge", 0.5, 0.0, {}),
    ("ipo", 0.3, 0.0, {}),
    ("robust", 0.5, 0.2, {}),
    ("exo_pair", 0.1, 1e-3, {}),
    ("nca_pair", 0.1, 0.0, {}),
    ("bco_pair", 0.2, 0.0, {}),
    ("sppo_hard", 0.1, 0.0, {}),
    ("aot", 0.1, 0.0, {}),
    ("aot", 0.3, 0.1, {}),
    ("aot_unpaired", 0.1, 0.1, {}),
    ("apo_zero", 0.1, 0.0, {}),
    ("apo_down", 0.1, 0.0, {}),
    ("discopop", 0.1, 0.0, {}),
    ("discopop", 0.5, 0.0, {"discopop_tau": 0.3}),
    ("sigmoid_norm", 0.1, 0.0, {}),
    ("sigmoid", 0.1, 0.0, {"f_divergence_type": "forward_kl"}),
    ("sigmoid", 0.1, 0.0, {"f_divergence_type": "js_divergence"}),
    ("hinge", 0.3, 0.0, {"f_divergence_type": "js_divergence"}),
    ("ipo", 0.3, 0.0, {"f_divergence_type": "forward_kl"}),
    ("robust", 0.2, 0.1, {"f_divergence_type": "forward_kl"}),
    ("exo_pair", 0.2, 1e-2, {"f_divergence_type": "js_divergence"}),
    ("discopop", 0.1, 0.0, {"f_divergence_type": "forward_kl"}),
    ("sigmoid_norm", 0.4, 0.0, {"f_divergence_type": "js_divergence"}),
]
#: TRL's α-divergence clamps through a float16/bfloat16/float32 table, so those cases run in float32.
ALPHA_CASES: list[tuple[str, float, float, dict[str, Any]]] = [
    ("sigmoid", 0.1, 0.0, {"f_divergence_type": "alpha_divergence"}),
    ("sigmoid", 0.1, 0.0, {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.2}),
    ("ipo", 0.3, 0.0, {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.7}),
    ("sigmoid", 0.1, 0.0, {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 1.0}),
]


def test_every_trl_pair_type_is_covered() -> None:
    assert {case[0] for case in CASES} == set(PAIR_LOSS_TYPES)


def _token_logps(seed: int, dtype: torch.dtype, b: int = 5, width: int = 10) -> dict[str, torch.Tensor]:
    """Per-token log-probs ``[2B, T-1]`` (chosen rows first), completion masks of random lengths."""
    g = torch.Generator().manual_seed(seed)
    completion_mask = torch.zeros(2 * b, width, dtype=torch.long)
    for row in range(2 * b):
        start = int(torch.randint(1, 4, (1,), generator=g))
        end = int(torch.randint(start + 1, width + 1, (1,), generator=g))
        completion_mask[row, start:end] = 1
    policy = (-torch.rand(2 * b, width - 1, generator=g, dtype=torch.float64) * 1.5).to(dtype)
    ref = (-torch.rand(2 * b, width - 1, generator=g, dtype=torch.float64) * 1.5).to(dtype)
    shift = completion_mask[:, 1:].to(dtype)
    return {"completion_mask": completion_mask, "policy": policy.requires_grad_(), "ref": ref * shift, "shift": shift}


def _function_parity(case: tuple[str, float, float, dict[str, Any]], seed: int, dtype: torch.dtype) -> None:
    from trl import DPOTrainer

    loss_type, beta, eps, extra = case
    t = _token_logps(seed, dtype)
    masked = t["policy"] * t["shift"]  # what a model's fused head returns: 0 off the completion
    ref_chosen, ref_rejected = t["ref"].sum(1).chunk(2)
    inputs = {
        "input_ids": torch.zeros_like(t["completion_mask"]),
        "attention_mask": torch.ones_like(t["completion_mask"]),
        "completion_mask": t["completion_mask"],
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    stub = _dpo_stub([loss_type], [1.0], beta, eps, **extra)
    theirs = DPOTrainer._compute_loss(stub, lambda **_: _outputs(masked), inputs, return_outputs=False)
    (their_grad,) = torch.autograd.grad(theirs, t["policy"])

    policy_chosen, policy_rejected = (t["policy"] * t["shift"]).sum(1).chunk(2)
    chosen_len, rejected_len = t["completion_mask"].sum(1).chunk(2)
    ours = preference_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta, loss_type=loss_type,
        label_smoothing=eps, chosen_lengths=chosen_len, rejected_lengths=rejected_len,
        f_divergence=extra.get("f_divergence_type", "reverse_kl"), f_alpha=extra.get("f_alpha_divergence_coef", 0.5),
        discopop_tau=extra.get("discopop_tau", 0.05),
    ).mean()  # fmt: skip
    (our_grad,) = torch.autograd.grad(ours, t["policy"])
    assert ours.dtype == dtype
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    if loss_type == "exo_pair":  # TRL builds log(1 - eps) and log(eps) as float32 constants
        tol = {"rtol": 1e-6, "atol": 1e-7}
    torch.testing.assert_close(ours, theirs.to(dtype), **tol)
    torch.testing.assert_close(our_grad, their_grad, **tol)
    assert our_grad.abs().sum() > 0


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[3].get('f_divergence_type', 'rkl')}-{c[1]}")
@pytest.mark.parametrize("seed", [0, 1])
def test_dpo_type_matches_trl_value_and_grad_float64(case: tuple[str, float, float, dict[str, Any]], seed: int) -> None:
    _function_parity(case, seed, torch.float64)


@pytest.mark.parametrize("case", ALPHA_CASES, ids=lambda c: f"alpha-{c[3].get('f_alpha_divergence_coef', 0.5)}")
def test_alpha_divergence_matches_trl_value_and_grad_float32(case: tuple[str, float, float, dict[str, Any]]) -> None:
    _function_parity(case, 2, torch.float32)


def test_f_divergence_rejected_where_trl_rejects_it() -> None:
    with pytest.raises(ValueError, match="f_divergence_type 'forward_kl' works only with loss_type"):
        DPOLoss.Config(loss_type="nca_pair", f_divergence_type="forward_kl")
    with pytest.raises(ValueError, match="exo_pair loss needs label_smoothing > 0"):
        DPOLoss.Config(loss_type="exo_pair")
    with pytest.raises(ValueError, match="'sigmoid', 'ipo', 'hinge', 'robust', 'exo_pair'"):
        DPOLoss.Config(loss_type="kto")


# --------------------------------------------------------------------------------------
# Pure CPO and ORPO functions, float64
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loss_type", "beta", "eps", "gamma", "alpha"),
    [
        ("sigmoid", 0.1, 0.0, 0.5, 0.0),
        ("sigmoid", 0.3, 0.2, 0.5, 0.0),
        ("hinge", 0.5, 0.0, 0.5, 0.0),
        ("ipo", 0.3, 0.0, 0.5, 0.0),
        ("simpo", 2.0, 0.1, 1.4, 0.0),
        ("sigmoid", 0.2, 0.0, 0.5, 0.3),  # AlphaPO
        ("simpo", 2.0, 0.0, 0.5, 0.25),
    ],
)
def test_cpo_loss_matches_trl_float64(loss_type: str, beta: float, eps: float, gamma: float, alpha: float) -> None:
    from trl.experimental.cpo import CPOTrainer

    g = torch.Generator().manual_seed(7)
    chosen = (-torch.rand(6, generator=g, dtype=torch.float64) * 3).requires_grad_()
    rejected = (-torch.rand(6, generator=g, dtype=torch.float64) * 3).requires_grad_()
    stub = SimpleNamespace(
        alpha=alpha, beta=beta, label_smoothing=eps, loss_type=loss_type, simpo_gamma=gamma, accelerator=_Accelerator()
    )
    theirs, _, _ = CPOTrainer.cpo_loss(stub, chosen, rejected)
    ours = cpo_loss(chosen, rejected, beta, loss_type, eps, gamma, alpha)  # type: ignore[arg-type]
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    their_grads = torch.autograd.grad(theirs.sum(), (chosen, rejected))
    our_grads = torch.autograd.grad(ours.sum(), (chosen, rejected))
    for a, b in zip(our_grads, their_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_odds_ratio_loss_matches_trl_float32(beta: float) -> None:
    """TRL's ORPO upcasts to float32 (``.float()``), so this one compares in float32."""
    from trl.experimental.orpo import ORPOTrainer

    g = torch.Generator().manual_seed(8)
    # Averages on both sides of -log 2, where log1mexp switches branch.
    chosen = (-torch.rand(8, generator=g) * 2).requires_grad_()
    rejected = (-torch.rand(8, generator=g) * 2).requires_grad_()
    stub = SimpleNamespace(beta=beta, accelerator=_Accelerator())
    their_terms = ORPOTrainer.odds_ratio_loss(stub, chosen, rejected)[0]
    ours = odds_ratio_loss(chosen, rejected, beta)
    torch.testing.assert_close(ours, -their_terms, rtol=1e-6, atol=1e-7)  # TRL returns β log σ, subtracted later
    their_grads = torch.autograd.grad(-their_terms.sum(), (chosen, rejected))
    for a, b in zip(torch.autograd.grad(ours.sum(), (chosen, rejected)), their_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------
# Components on one tiny model, float32: value and every parameter's gradient
# --------------------------------------------------------------------------------------


def pair_batch(tok: Any, n: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    """Arithmetic pairs of varied lengths (prompt and answers), collated by the ``preference`` data."""
    rng = random.Random(seed)
    data = PreferenceData.__new__(PreferenceData)
    data.pad_token_id = tok.pad_token_id
    examples = []
    for _ in range(n):
        a, b = rng.randrange(200), rng.randrange(2000)
        p = tok(f"{a}+{b}=", add_special_tokens=False)["input_ids"]
        example: dict[str, Any] = {"margin": 0.0}
        for side, text in (("chosen", str(a + b)), ("rejected", str(a + b + rng.choice([-11, -1, 1, 100])))):
            c = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            example[f"{side}_input_ids"] = p + c
            example[f"{side}_labels"] = [-100] * len(p) + c
        examples.append(example)
    return data.collate(examples)


def _grads(model: torch.nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss, params, allow_unused=True))


def _assert_same(ours: torch.Tensor, theirs: torch.Tensor, g_ours: list[Any], g_theirs: list[Any]) -> None:
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    checked = 0
    for a, b in zip(g_ours, g_theirs):
        if a is None or b is None:
            assert a is None or a.abs().max() == 0
            assert b is None or b.abs().max() == 0
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        checked += 1
    assert checked > 0


@pytest.fixture(scope="module")
def setup() -> dict[str, Any]:
    tok = char_tokenizer("0123456789+=")
    policy = tiny_model(tok)
    reference = frozen_copy(tiny_model(tok, seed=1))
    return {"tok": tok, "policy": policy, "reference": reference, "batch": pair_batch(tok)}


def _trl_dpo_on_model(setup: dict[str, Any], batch: dict[str, torch.Tensor], stub: SimpleNamespace) -> torch.Tensor:
    from trl import DPOTrainer

    policy = setup["policy"]
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])

    def model(input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any) -> SimpleNamespace:
        logits = policy(input_ids=input_ids, attention_mask=attention_mask).logits
        return _outputs(logps_from_logits(logits, labels).logps[:, 1:])

    inputs = {
        "input_ids": torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]]),
        "attention_mask": torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]]),
        "completion_mask": (labels != -100).long(),
        "ref_chosen_logps": batch["ref_chosen_logps"],
        "ref_rejected_logps": batch["ref_rejected_logps"],
    }
    return DPOTrainer._compute_loss(stub, model, inputs, return_outputs=False)


def _engine_total(losses: list[tuple[float, Any]], models: Models, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The engine's total for one micro-batch: ``sum_i w_i * out_i.sum / count_i``."""
    total = torch.zeros(())
    for weight, loss in losses:
        out = loss(models, batch)
        assert torch.equal(out.count, loss.count(batch))
        total = total + weight * out.sum / out.count
    return total


def _with_reference(setup: dict[str, Any], losses: list[DPOLoss]) -> dict[str, torch.Tensor]:
    batch = dict(setup["batch"])
    models = Models({"policy": setup["policy"], "reference": setup["reference"]})
    for loss in losses:
        if loss.config.loss_type != "sft":
            batch.update(loss.reference_logps(models, batch))
    first = next(loss for loss in losses if loss.config.loss_type != "sft")
    batch["ref_chosen_logps"], batch["ref_rejected_logps"] = batch[first.ref_keys[0]], batch[first.ref_keys[1]]
    return batch


@pytest.mark.parametrize(
    "case",
    [CASES[0], CASES[2], CASES[9], CASES[-1]],  # sigmoid, ipo (lengths), aot (sorts the batch), sigmoid_norm + JS
    ids=lambda c: f"{c[0]}-{c[3].get('f_divergence_type', 'rkl')}-{c[1]}",
)
def test_dpo_component_matches_trl_on_a_model(setup: dict[str, Any], case: tuple[str, float, float, dict[str, Any]]) -> None:
    loss_type, beta, eps, extra = case
    loss = DPOLoss(DPOLoss.Config(loss_type=loss_type, beta=beta, label_smoothing=eps, chunk_size=0, **extra))
    batch = _with_reference(setup, [loss])
    models = Models({"policy": setup["policy"], "reference": setup["reference"]})
    ours = _engine_total([(1.0, loss)], models, batch)
    g_ours = _grads(setup["policy"], ours)
    theirs = _trl_dpo_on_model(setup, batch, _dpo_stub([loss_type], [1.0], beta, eps, **extra))
    _assert_same(ours, theirs, g_ours, _grads(setup["policy"], theirs))


@pytest.mark.parametrize(
    "mix",
    [
        [("sigmoid", 0.8), ("sft", 0.2)],
        [("sigmoid", 0.8), ("bco_pair", 0.2), ("sft", 1.0)],  # MPO's example weights
        [("sft", 1.0)],
    ],
    ids=lambda m: "+".join(t for t, _ in m),
)
def test_mpo_recipe_list_equals_trl_loss_type_list(setup: dict[str, Any], mix: list[tuple[str, float]]) -> None:
    """``loss: [{name: dpo, loss_type: sigmoid, weight: 0.8}, {name: dpo, loss_type: sft, weight: 0.2}]``."""
    losses = [(w, DPOLoss(DPOLoss.Config(loss_type=t, chunk_size=0))) for t, w in mix]  # type: ignore[arg-type]
    batch = _with_reference(setup, [loss for _, loss in losses]) if any(t != "sft" for t, _ in mix) else dict(setup["batch"])
    batch.setdefault("ref_chosen_logps", torch.zeros(batch["chosen_input_ids"].shape[0]))
    batch.setdefault("ref_rejected_logps", torch.zeros(batch["chosen_input_ids"].shape[0]))
    models = Models({"policy": setup["policy"], "reference": setup["reference"]})
    ours = _engine_total(losses, models, batch)
    g_ours = _grads(setup["policy"], ours)
    stub = _dpo_stub([t for t, _ in mix], [w for _, w in mix], 0.1, 0.0)
    theirs = _trl_dpo_on_model(setup, batch, stub)
    _assert_same(ours, theirs, g_ours, _grads(setup["policy"], theirs))


def test_sft_type_counts_chosen_tokens_and_needs_no_reference(setup: dict[str, Any]) -> None:
    config = DPOLoss.Config(loss_type="sft")
    caps = DPOLoss.capabilities(config)
    assert not caps.precompute and caps.live_roles == ("policy",)
    batch = setup["batch"]
    assert DPOLoss(config).count(batch).item() == int((batch["chosen_labels"][:, 1:] != -100).sum())
    with pytest.raises(ValueError, match="nll_weight"):
        DPOLoss.Config(loss_type="sft", nll_weight=1.0)
    assert DPOLoss.capabilities(DPOLoss.Config(loss_type="aot")).whole_batch


def _cpo_stub(trainer: Any, **options: Any) -> SimpleNamespace:
    stub = SimpleNamespace(
        is_encoder_decoder=False, pad_token_id=0, padding_value=0, accelerator=_Accelerator(), aux_loss_enabled=False,
        concatenated_inputs=trainer.concatenated_inputs, get_batch_logps=trainer.get_batch_logps, **options,
    )  # fmt: skip
    stub.concatenated_forward = lambda model, batch: trainer.concatenated_forward(stub, model, batch)
    for name in ("cpo_loss", "odds_ratio_loss"):
        if hasattr(trainer, name):
            setattr(stub, name, lambda *a, _n=name: getattr(trainer, _n)(stub, *a))
    return stub


@pytest.mark.parametrize(
    "options",
    [
        {"loss_type": "sigmoid"},
        {"loss_type": "sigmoid", "label_smoothing": 0.1, "cpo_alpha": 0.5},
        {"loss_type": "ipo", "beta": 0.3},
        {"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 1.0},
        {"loss_type": "simpo", "beta": 2.0, "cpo_alpha": 0.0},
        {"loss_type": "sigmoid", "alpha": 0.1},
    ],
    ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()),
)
def test_cpo_component_matches_trl_on_a_model(setup: dict[str, Any], options: dict[str, Any]) -> None:
    from trl.experimental.cpo import CPOTrainer

    config = CPOLoss.Config(chunk_size=0, **options)
    loss = CPOLoss(config)
    models = Models({"policy": setup["policy"]})
    ours = _engine_total([(1.0, loss)], models, setup["batch"])
    g_ours = _grads(setup["policy"], ours)
    stub = _cpo_stub(
        CPOTrainer, beta=config.beta, label_smoothing=config.label_smoothing, loss_type=config.loss_type,
        simpo_gamma=config.simpo_gamma, cpo_alpha=config.cpo_alpha, alpha=config.alpha,
    )  # fmt: skip
    theirs, _ = CPOTrainer.get_batch_loss_metrics(stub, setup["policy"], dict(setup["batch"]))
    _assert_same(ours, theirs, g_ours, _grads(setup["policy"], theirs))


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_component_matches_trl_on_a_model(setup: dict[str, Any], beta: float) -> None:
    from trl.experimental.orpo import ORPOTrainer

    loss = ORPOLoss(ORPOLoss.Config(beta=beta, chunk_size=0))
    ours = _engine_total([(1.0, loss)], Models({"policy": setup["policy"]}), setup["batch"])
    g_ours = _grads(setup["policy"], ours)
    stub = _cpo_stub(ORPOTrainer, beta=beta)
    theirs, _ = ORPOTrainer.get_batch_loss_metrics(stub, setup["policy"], dict(setup["batch"]))
    _assert_same(ours, theirs, g_ours, _grads(setup["policy"], theirs))


@pytest.mark.parametrize(
    ("cls", "options", "label_fields"),
    [
        (CPOLoss, {"nll_reduction": "pair"}, None),
        (CPOLoss, {"loss_type": "simpo", "beta": 2.0, "cpo_alpha": 0.0}, None),
        (ORPOLoss, {"nll_reduction": "pair", "nll_on_prompt": False}, None),
        (ORPOLoss, {"nll_reduction": "pair"}, ("rejected_labels",)),  # TRL's NLL covers the chosen prompt
        (DPOLoss, {"loss_type": "sft"}, None),
        (DPOLoss, {"loss_type": "apo_down"}, None),
    ],
)
def test_component_contract(setup: dict[str, Any], cls: Any, options: dict[str, Any], label_fields: Any) -> None:
    """Micro-batch exactness holds where the loss is per pair (or per token): ``nll_reduction: pair``."""
    models = Models({"policy": setup["policy"], "reference": setup["reference"]})
    check_loss_contract(cls(cls.Config(**options)), models, setup["batch"], label_fields=label_fields)


def test_batch_nll_needs_the_whole_batch() -> None:
    assert CPOLoss.capabilities(CPOLoss.Config()).whole_batch
    assert not CPOLoss.capabilities(CPOLoss.Config(cpo_alpha=0.0)).whole_batch
    assert ORPOLoss.capabilities(ORPOLoss.Config()).whole_batch
    assert not ORPOLoss.capabilities(ORPOLoss.Config(nll_reduction="pair")).whole_batch
