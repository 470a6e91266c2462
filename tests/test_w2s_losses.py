"""Weak-to-strong losses against hand computations, TRL's GKD loss, and the loss contract."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

import aligntk_w2s
from aligntk_w2s.losses import (
    aux_alpha,
    aux_conf_loss,
    aux_conf_target,
    hard_label_ce,
    harden_binary,
    harden_to_prior,
    label_ce,
    prior_counts,
    product_loss,
    product_target,
    soft_label_ce,
    token_distill,
)

import aligntk  # noqa: E402
from aligntk import Models  # noqa: E402
from aligntk.testing import char_tokenizer, check_loss_contract, tiny_batch, tiny_model  # noqa: E402


def logits_of(probs: list[list[float]]) -> torch.Tensor:
    """Logits whose softmax is exactly ``probs`` (rows summing to 1)."""
    return torch.tensor(probs, dtype=torch.float64).log().float()


def ce(target: list[float], probs: list[float]) -> float:
    return -sum(t * math.log(p) for t, p in zip(target, probs) if t > 0)


# --------------------------------------------------------------------------------------
# Soft and hard label cross-entropy
# --------------------------------------------------------------------------------------


def test_soft_label_ce_by_hand() -> None:
    logits = logits_of([[0.25, 0.75], [0.5, 0.5]])
    targets = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    expected = [ce([0.5, 0.5], [0.25, 0.75]), ce([0.9, 0.1], [0.5, 0.5])]
    assert torch.allclose(soft_label_ce(logits, targets), torch.tensor(expected), atol=1e-6)
    assert torch.allclose(label_ce(logits, targets), torch.tensor(expected), atol=1e-6)


def test_hard_label_ce_uses_the_supervisors_argmax() -> None:
    logits = logits_of([[0.25, 0.75], [0.1, 0.9]])
    targets = torch.tensor([[0.2, 0.8], [0.6, 0.4]])
    expected = torch.tensor([-math.log(0.75), -math.log(0.1)])
    assert torch.allclose(hard_label_ce(logits, targets), expected, atol=1e-6)
    assert torch.allclose(label_ce(logits, targets, hard=True), expected, atol=1e-6)


def test_losses_upcast_half_precision_logits() -> None:
    logits = torch.randn(4, 3).to(torch.bfloat16)
    weak = torch.softmax(torch.randn(4, 3), dim=-1)
    for fn in (soft_label_ce, hard_label_ce, product_loss):
        out = fn(logits, weak)
        assert out.dtype == torch.float32 and torch.equal(out, fn(logits.float(), weak))
    assert aux_conf_loss(logits, weak, 0.5).dtype == torch.float32


# --------------------------------------------------------------------------------------
# Auxiliary confidence
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "expected"),
    [(1, 0.0), (6, 0.125), (11, 0.25), (16, 0.375), (21, 0.5), (60, 0.5), (100, 0.5)],
)
def test_aux_alpha_ramps_linearly_over_the_warmup_fraction(step: int, expected: float) -> None:
    # 100 steps, warm-up 20% -> alpha = 0.5 * min(1, ((step - 1) / 100) / 0.2).
    assert math.isclose(aux_alpha(step, 100, alpha_max=0.5, warmup_frac=0.2), expected)


def test_aux_alpha_without_warmup_is_flat() -> None:
    assert aux_alpha(1, 10, alpha_max=0.75, warmup_frac=0.0) == 0.75


def test_binary_hardening_matches_the_weak_prior_of_positives() -> None:
    # Student P(class 0) = 0.9, 0.6, 0.3, 0.1.
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.1, 0.9]])
    # Weak prior of class 1 = 0.5: threshold = median of P(class 0) = (0.3 + 0.6) / 2 = 0.45,
    # so the two examples with P(class 0) < 0.45 become class 1.
    hard = harden_binary(probs, torch.tensor([0.5, 0.5]))
    assert hard.tolist() == [[1, 0], [1, 0], [0, 1], [0, 1]]
    # Weak prior of class 1 = 0.25: threshold = 25% quantile = 0.1 + 0.75 * (0.3 - 0.1) = 0.25,
    # so only the last example becomes class 1, although two have P(class 1) > 0.5.
    hard = harden_binary(probs, torch.tensor([0.75, 0.25]))
    assert hard.tolist() == [[1, 0], [1, 0], [1, 0], [0, 1]]


def test_binary_hardening_reproduces_burns_et_al() -> None:
    # The rule of logconf_loss_fn in github.com/openai/weak-to-strong (weak_to_strong/loss.py).
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(9, 2), dim=-1)
    weak = torch.softmax(torch.randn(9, 2), dim=-1)
    mean_weak = weak.mean(dim=0)
    threshold = torch.quantile(probs[:, 0], mean_weak[1])
    paper = torch.cat([(probs[:, 0] >= threshold)[:, None], (probs[:, 0] < threshold)[:, None]], dim=1).float()
    assert torch.equal(harden_binary(probs, mean_weak), paper)


def test_aux_conf_loss_binary_by_hand() -> None:
    student = [[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.1, 0.9]]
    # Weak labels with class-1 prior (0.1 + 0.1 + 0.4 + 0.4) / 4 = 0.25: only example 3 is hardened to 1.
    weak = [[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]]
    hardened = [[1, 0], [1, 0], [1, 0], [0, 1]]
    alpha = 0.5
    targets = [[(1 - alpha) * w + alpha * h for w, h in zip(wr, hr)] for wr, hr in zip(weak, hardened)]
    expected = torch.tensor([ce(t, p) for t, p in zip(targets, student)])
    logits = logits_of(student).requires_grad_()
    loss = aux_conf_loss(logits, torch.tensor(weak), alpha)
    assert torch.allclose(loss, expected, atol=1e-6)
    # The hardened labels are detached: the gradient is that of CE with a constant target.
    loss.sum().backward()
    assert torch.allclose(logits.grad, torch.tensor(student) - torch.tensor(targets), atol=1e-6)


def test_aux_conf_loss_at_alpha_zero_is_soft_ce() -> None:
    logits = torch.randn(5, 2)
    weak = torch.softmax(torch.randn(5, 2), dim=-1)
    assert torch.allclose(aux_conf_loss(logits, weak, 0.0), soft_label_ce(logits, weak))


def test_aux_conf_loss_depends_on_the_batch_it_thresholds_over() -> None:
    # Documents why w2s_aux_conf wants one micro-batch per step: the class prior and the
    # quantile are per call, so splitting a batch changes the hardened labels.
    student = [[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.1, 0.9]]
    weak = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]])
    logits = logits_of(student)
    whole = aux_conf_loss(logits, weak, 0.5).sum()
    halves = aux_conf_loss(logits[:2], weak[:2], 0.5).sum() + aux_conf_loss(logits[2:], weak[2:], 0.5).sum()
    assert not torch.isclose(whole, halves)


def test_prior_counts_round_by_largest_remainder() -> None:
    assert prior_counts(torch.tensor([0.5, 0.25, 0.25]), 4) == [2, 1, 1]
    assert prior_counts(torch.tensor([1 / 3, 1 / 3, 1 / 3]), 4) == [2, 1, 1]
    assert prior_counts(torch.tensor([0.45, 0.45, 0.1]), 4) == [2, 2, 0]
    assert prior_counts(torch.tensor([0.0, 1.0]), 3) == [0, 3]


def test_multiclass_hardening_fills_classes_to_the_weak_prior() -> None:
    # Every example's argmax is class 0, but the weak prior [0.5, 0.25, 0.25] gives
    # class 0 two places, classes 1 and 2 one each. Pairs from the most probable:
    # (ex3, c0) .8 take; (ex0, c0) .7 take, c0 full; (ex1, c0) .6 and (ex2, c0) .5 full;
    # (ex2, c2) .4 take; (ex1, c1) .3 take.
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.5, 0.1, 0.4], [0.8, 0.1, 0.1]])
    hard = harden_to_prior(probs, torch.tensor([0.5, 0.25, 0.25]))
    assert hard.argmax(-1).tolist() == [0, 1, 2, 0]
    assert hard.sum(-1).tolist() == [1, 1, 1, 1]


def test_multiclass_aux_conf_target_by_hand() -> None:
    student = [[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.5, 0.1, 0.4], [0.8, 0.1, 0.1]]
    weak = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 0, 0]])  # prior [.5, .25, .25]
    hardened = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 0, 0]])
    target = aux_conf_target(logits_of(student), weak, 0.3)
    assert torch.allclose(target, 0.7 * weak + 0.3 * hardened)


def test_two_class_greedy_assignment_agrees_with_quantile_rule() -> None:
    # For distinct probabilities the paper's quantile labels ceil((N - 1) * prior1) examples as
    # class 1; the greedy assignment with that many places picks the same examples.
    torch.manual_seed(1)
    probs = torch.softmax(torch.randn(10, 2), dim=-1)
    prior = torch.tensor([0.7, 0.3])
    quantile_rule = harden_binary(probs, prior)
    k1 = int(quantile_rule[:, 1].sum())
    assert k1 == math.ceil(9 * 0.3)
    greedy = harden_to_prior(probs, torch.tensor([1 - k1 / 10, k1 / 10]))
    assert torch.equal(greedy, quantile_rule)


# --------------------------------------------------------------------------------------
# Product loss
# --------------------------------------------------------------------------------------


def test_product_target_and_loss_by_hand() -> None:
    student = [[0.25, 0.75]]
    weak = torch.tensor([[0.6, 0.4]])
    # alpha = beta = 1: [.25 * .6, .75 * .4] = [.15, .3] -> [1/3, 2/3].
    assert torch.allclose(product_target(logits_of(student), weak), torch.tensor([[1 / 3, 2 / 3]]))
    assert math.isclose(product_loss(logits_of(student), weak).item(), ce([1 / 3, 2 / 3], student[0]), rel_tol=1e-6)
    # beta = 2: [.0625 * .6, .5625 * .4] = [.0375, .225] -> [1/7, 6/7].
    target = product_target(logits_of(student), weak, alpha=1.0, beta=2.0)
    assert torch.allclose(target, torch.tensor([[1 / 7, 6 / 7]]), atol=1e-6)
    # alpha = 0, beta = 1: the student's own distribution.
    assert torch.allclose(product_target(logits_of(student), weak, alpha=0.0), torch.tensor(student), atol=1e-6)


def test_product_loss_handles_zero_weak_probability_and_detaches_target() -> None:
    logits = logits_of([[0.25, 0.75]]).requires_grad_()
    weak = torch.tensor([[1.0, 0.0]])
    loss = product_loss(logits, weak)
    assert math.isclose(loss.item(), -math.log(0.25), rel_tol=1e-6)
    loss.backward()
    assert torch.allclose(logits.grad, torch.tensor([[0.25 - 1.0, 0.75]]), atol=1e-6)


# --------------------------------------------------------------------------------------
# Token distillation
# --------------------------------------------------------------------------------------


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


STUDENT = [[0.5, 0.5], [0.3, 0.7], [0.25, 0.75], [0.6, 0.4]]
TEACHER = [[0.9, 0.1], [0.2, 0.8], [0.5, 0.5], [0.1, 0.9]]
# labels[1:] = [1, -100, 0]: positions 0 and 2 predict output tokens; 1 and 3 do not.
LABELS = torch.tensor([[-100, 1, -100, 0]])


def test_token_distill_forward_and_reverse_kl_by_hand() -> None:
    student, teacher = logits_of(STUDENT)[None], logits_of(TEACHER)[None]
    total, count = token_distill(student, teacher, LABELS, "forward_kl")
    assert count.item() == 2
    assert math.isclose(total.item(), kl(TEACHER[0], STUDENT[0]) + kl(TEACHER[2], STUDENT[2]), rel_tol=1e-5)
    total, _ = token_distill(student, teacher, LABELS, "reverse_kl")
    assert math.isclose(total.item(), kl(STUDENT[0], TEACHER[0]) + kl(STUDENT[2], TEACHER[2]), rel_tol=1e-5)


def test_token_distill_jsd_and_temperature_by_hand() -> None:
    student, teacher = logits_of(STUDENT)[None], logits_of(TEACHER)[None]
    beta = 0.3

    def jsd(s: list[float], t: list[float]) -> float:
        m = [beta * b + (1 - beta) * a for a, b in zip(s, t)]
        return beta * kl(t, m) + (1 - beta) * kl(s, m)

    total, _ = token_distill(student, teacher, LABELS, "jsd", beta=beta)
    assert math.isclose(total.item(), jsd(STUDENT[0], TEACHER[0]) + jsd(STUDENT[2], TEACHER[2]), rel_tol=1e-5)

    # Temperature 2 on log-probabilities: softmax(log p / 2) is sqrt(p), renormalized.
    def soften(p: list[float]) -> list[float]:
        roots = [math.sqrt(x) for x in p]
        return [r / sum(roots) for r in roots]

    total, _ = token_distill(student, teacher, LABELS, "forward_kl", temperature=2.0)
    expected = kl(soften(TEACHER[0]), soften(STUDENT[0])) + kl(soften(TEACHER[2]), soften(STUDENT[2]))
    assert math.isclose(total.item(), expected, rel_tol=1e-5)


def test_token_distill_gives_no_gradient_to_ignored_positions() -> None:
    student = torch.randn(2, 5, 7, requires_grad=True)
    teacher = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, -100, -100]])
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        student.grad = None
        total, count = token_distill(student, teacher, labels, kind)
        total.backward()
        ignored = torch.ones(2, 5, dtype=torch.bool)
        ignored[:, :-1] = labels[:, 1:] == -100
        assert count.item() == 4
        assert student.grad[ignored].abs().max().item() == 0.0
        assert student.grad[~ignored].abs().sum().item() > 0


def test_token_distill_rejects_bad_options() -> None:
    x = torch.randn(1, 3, 4)
    labels = torch.tensor([[-100, 1, 2]])
    with pytest.raises(ValueError, match="beta"):
        token_distill(x, x, labels, "jsd", beta=0.0)
    with pytest.raises(ValueError, match="temperature"):
        token_distill(x, x, labels, temperature=0.0)
    with pytest.raises(ValueError, match="unknown divergence"):
        token_distill(x, x, labels, "tvd")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def trl_gkd_loss() -> Callable[..., torch.Tensor]:
    gkd = pytest.importorskip("trl.experimental.gkd", reason="TRL's GKD trainer is not installed")
    return gkd.GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize(
    ("kind", "beta", "trl_beta"),
    [("forward_kl", 0.5, 0.0), ("reverse_kl", 0.5, 1.0), ("jsd", 0.5, 0.5), ("jsd", 0.1, 0.1), ("jsd", 0.9, 0.9)],
)
def test_token_distill_equals_trl_gkd(
    trl_gkd_loss: Callable[..., torch.Tensor], kind: str, beta: float, trl_beta: float, temperature: float
) -> None:
    torch.manual_seed(0)
    student = torch.randn(3, 6, 11) * 3
    teacher = torch.randn(3, 6, 11) * 3
    labels = torch.randint(0, 11, (3, 6))
    labels[0, :3] = -100
    labels[1, 4:] = -100
    labels[2, :2] = -100
    total, count = token_distill(student, teacher, labels, kind, beta, temperature)  # type: ignore[arg-type]
    # TRL takes logits and labels already aligned (its compute_loss shifts them); its kl_div
    # elements are summed over the vocabulary and masked positions by reduction="sum".
    args = (student[:, :-1], teacher[:, :-1], labels[:, 1:])
    trl_sum = trl_gkd_loss(*args, beta=trl_beta, temperature=temperature, reduction="sum")
    trl_mean = trl_gkd_loss(*args, beta=trl_beta, temperature=temperature, reduction="batchmean")
    assert torch.allclose(total, trl_sum, rtol=1e-5, atol=1e-5)
    assert torch.allclose(total / count, trl_mean, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------


def tiny_classifier(num_labels: int = 2, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        "llama",
        num_labels=num_labels,
        vocab_size=16,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        pad_token_id=0,
    )
    return AutoModelForSequenceClassification.from_config(config)


def classification_batch(num_labels: int = 2, n: int = 4) -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    ids = torch.randint(1, 16, (n, 6))
    mask = torch.ones(n, 6, dtype=torch.long)
    mask[1, 4:] = 0  # right padding
    mask[3, 3:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask, "soft_labels": torch.softmax(torch.randn(n, num_labels), -1)}


def test_plugin_registers_its_losses() -> None:
    # aligntk_w2s is installed through its entry point; passing it again as an extra would be
    # refused as a second plugin named 'w2s', so the installed one is what is checked.
    loaded = aligntk.load_plugins()
    losses = {r.name: r.cls for r in loaded.registry.by_plugin("w2s") if r.kind == "loss"}
    assert losses == {
        "w2s_ce": aligntk_w2s.W2SCE,
        "w2s_aux_conf": aligntk_w2s.W2SAuxConf,
        "w2s_product": aligntk_w2s.W2SProduct,
        "token_distill": aligntk_w2s.TokenDistill,
    }


@pytest.mark.parametrize(
    ("cls", "options"),
    [
        (aligntk_w2s.W2SCE, {}),
        (aligntk_w2s.W2SCE, {"hard": True}),
        (aligntk_w2s.W2SAuxConf, {}),
        (aligntk_w2s.W2SProduct, {"alpha": 1.0, "beta": 0.5}),
    ],
)
def test_classification_components_keep_the_loss_contract(cls: type, options: dict) -> None:
    loss = cls(cls.Config(**options))
    batch = classification_batch()
    models = Models({"policy": tiny_classifier()})
    done = check_loss_contract(loss, models, batch)
    assert "gradients flow" in done and "micro-batch split gives the same sum and count" in done
    assert loss.count(batch).item() == 4


def test_w2s_ce_component_equals_the_pure_function() -> None:
    model = tiny_classifier(num_labels=3)
    batch = classification_batch(num_labels=3)
    out = aligntk_w2s.W2SCE(aligntk_w2s.W2SCE.Config())(Models({"policy": model}), batch)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(out.sum, soft_label_ce(logits, batch["soft_labels"]).sum(), atol=1e-5)
    assert out.count.item() == 4


def test_aux_conf_component_ramps_alpha_with_start_step() -> None:
    loss = aligntk_w2s.W2SAuxConf(aligntk_w2s.W2SAuxConf.Config(alpha_max=0.5, warmup_frac=0.2))
    model = tiny_classifier()
    batch = classification_batch()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for step, alpha in ((1, 0.0), (6, 0.125), (11, 0.25), (50, 0.5)):
        loss.start_step(step, 100)
        assert loss.alpha == alpha
        with torch.no_grad():
            out = loss(Models({"policy": model}), batch)
        assert torch.allclose(out.sum, aux_conf_loss(logits, batch["soft_labels"], alpha).sum(), atol=1e-5)
        assert math.isclose(out.metrics["aux_alpha"].item() / out.count.item(), alpha)


def test_classification_component_rejects_a_mismatched_head() -> None:
    loss = aligntk_w2s.W2SCE(aligntk_w2s.W2SCE.Config())
    with pytest.raises(ValueError, match="num_labels"):
        loss(Models({"policy": tiny_classifier(num_labels=2)}), classification_batch(num_labels=3))


def test_component_options_are_validated() -> None:
    with pytest.raises(Exception, match="alpha_max"):
        aligntk_w2s.W2SAuxConf.Config(alpha_max=1.5)
    with pytest.raises(Exception, match="kind"):
        aligntk_w2s.TokenDistill.Config(kind="tvd")
    with pytest.raises(Exception, match="unknown|extra"):
        aligntk_w2s.W2SCE.Config(hardd=True)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_token_distill_component_keeps_the_loss_contract(kind: str) -> None:
    tok = char_tokenizer()
    teacher = tiny_model(tok, seed=1).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    models = Models({"policy": tiny_model(tok, seed=0), "teacher": teacher})
    loss = aligntk_w2s.TokenDistill(aligntk_w2s.TokenDistill.Config(kind=kind))
    batch = tiny_batch(tok)
    done = check_loss_contract(loss, models, batch)
    assert "ignored tokens get no gradient" in done
    out = loss(models, batch)
    with torch.no_grad():
        student = models.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        teach = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected, count = token_distill(student, teach, batch["labels"], kind)  # type: ignore[arg-type]
    assert torch.allclose(out.sum, expected, atol=1e-5) and out.count == count
