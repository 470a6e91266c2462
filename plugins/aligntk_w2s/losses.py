"""Weak-to-strong losses as pure tensor functions.

Burns et al. 2023, "Weak-to-Strong Generalization: Eliciting Strong Capabilities With
Weak Supervision", https://arxiv.org/abs/2312.09390 (code: github.com/openai/weak-to-strong).
Token distillation follows Agarwal et al. 2023, "On-Policy Distillation of Language
Models" (GKD), https://arxiv.org/abs/2306.13649.

Every function upcasts logits to float32 before a softmax and returns per-example losses
(``[N]``) or a ``(sum, count)`` pair, never a mean: the engine normalizes.
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F

from aligntk import IGNORE_INDEX, Divergence, token_divergence

#: The divergences token distillation offers (``aligntk.token_divergence``).
DistillKind = Divergence


# --------------------------------------------------------------------------------------
# Cross-entropy on the supervisor's labels
# --------------------------------------------------------------------------------------


def soft_label_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a probability target, per example.

    ``-sum_c targets[n, c] * log softmax(logits)[n, c]``: the naive weak-to-strong
    baseline of Burns et al. 2023 (https://arxiv.org/abs/2312.09390, section 4.1).

    Args:
        logits: ``[N, C]`` student logits.
        targets: ``[N, C]`` target probabilities (rows sum to 1).

    Returns:
        ``[N]`` per-example loss.
    """
    return -(targets.float() * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1)


def hard_label_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the supervisor's most likely class, per example.

    Args:
        logits: ``[N, C]`` student logits.
        targets: ``[N, C]`` supervisor probabilities; the argmax is the label (first on ties).

    Returns:
        ``[N]`` per-example loss.
    """
    return F.cross_entropy(logits.float(), targets.argmax(dim=-1), reduction="none")


def label_ce(logits: torch.Tensor, targets: torch.Tensor, hard: bool = False) -> torch.Tensor:
    """``hard_label_ce`` if ``hard`` else ``soft_label_ce``; shapes as there (``[N, C]`` -> ``[N]``)."""
    return hard_label_ce(logits, targets) if hard else soft_label_ce(logits, targets)


# --------------------------------------------------------------------------------------
# Auxiliary confidence loss
# --------------------------------------------------------------------------------------


def aux_alpha(step: int, max_steps: int, alpha_max: float = 0.5, warmup_frac: float = 0.2) -> float:
    """The auxiliary-confidence weight at an optimizer step: a linear ramp, then flat.

    ``alpha = alpha_max * min(1, progress / warmup_frac)`` with
    ``progress = (step - 1) / max_steps``. ``step`` counts from 1 as in the engine, so the
    first step trains on the weak labels alone (``progress`` 0, as the paper's
    ``step_frac`` is on its first step) and ``alpha_max`` is reached once a fraction
    ``warmup_frac`` of training has passed. ``warmup_frac == 0`` means no warm-up.

    The paper's code (``logconf_loss_fn``) uses ``aux_coef * step_frac`` during warm-up,
    i.e. it ramps only to ``warmup_frac * aux_coef`` and then jumps to ``aux_coef``; this
    function is the continuous ramp to ``alpha_max`` instead.

    Args:
        step: the optimizer step about to run, from 1.
        max_steps: the number of optimizer steps in the run.
        alpha_max: the weight after warm-up (Burns et al. use 0.5, or 0.75 for large gaps).
        warmup_frac: the fraction of training over which the weight ramps up.

    Returns:
        The weight ``alpha`` in ``[0, alpha_max]``.
    """
    progress = max(step - 1, 0) / max(max_steps, 1)
    if warmup_frac <= 0:
        return alpha_max
    return alpha_max * min(1.0, progress / warmup_frac)


def harden_binary(probs: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """Binary hardening with the threshold of Burns et al.'s ``logconf_loss_fn``.

    The threshold is ``torch.quantile(probs[:, 0], prior[1])`` (linear interpolation);
    an example is hardened to class 0 when ``probs[n, 0] >= threshold`` and to class 1
    otherwise. For distinct probabilities this labels ``ceil((N - 1) * prior[1])``
    examples as class 1: those the student finds least likely to be class 0. So the
    share of hardened positives tracks the weak labels' share of class 1 rather than a
    fixed 0.5 cut.

    Args:
        probs: ``[N, 2]`` student probabilities.
        prior: ``[2]`` class prior of the weak labels (their mean over the batch).

    Returns:
        ``[N, 2]`` one-hot hardened labels (float, no gradient).
    """
    threshold = torch.quantile(probs[:, 0], prior[1].clamp(0.0, 1.0))
    is_zero = probs[:, 0] >= threshold
    return torch.stack([is_zero, ~is_zero], dim=1).to(probs.dtype)


def prior_counts(prior: torch.Tensor, n: int) -> list[int]:
    """How many of ``n`` examples each class gets: ``n * prior`` rounded by largest remainder.

    Args:
        prior: ``[C]`` class probabilities summing to 1.
        n: the number of examples.

    Returns:
        ``C`` non-negative integers summing to ``n``; ties go to the lower class index.
    """
    exact = (prior.double().clamp(min=0) / prior.double().clamp(min=0).sum()) * n
    counts = [math.floor(x) for x in exact.tolist()]
    remainders = sorted(range(len(counts)), key=lambda c: (-(exact[c].item() - counts[c]), c))
    for c in remainders[: n - sum(counts)]:
        counts[c] += 1
    return counts


def harden_to_prior(probs: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """Multi-class hardening: assign each example one class, with class sizes set by the prior.

    Class ``c`` receives ``prior_counts(prior, N)[c]`` examples. The assignment is
    greedy: all ``(example, class)`` pairs are visited from the most to the least
    probable under the student, and a pair is taken when the example is still free and
    the class still has room. Each class so accepts examples above its own implicit
    threshold (the probability of the last pair it took), which generalizes the
    paper's single binary quantile threshold to per-class thresholds matching the weak
    labels' class prior. Greedy, not an optimal assignment: it needs no solver and on
    two classes it gives class 1 the examples ranked highest by ``probs[:, 1]``.

    Args:
        probs: ``[N, C]`` student probabilities.
        prior: ``[C]`` class prior of the weak labels.

    Returns:
        ``[N, C]`` one-hot hardened labels (float, no gradient).
    """
    n, c = probs.shape
    room = prior_counts(prior, n)
    order = torch.argsort(probs.detach().flatten(), descending=True, stable=True).tolist()
    assigned = [-1] * n
    for flat in order:
        row, cls = divmod(flat, c)
        if assigned[row] < 0 and room[cls] > 0:
            assigned[row] = cls
            room[cls] -= 1
    return F.one_hot(torch.tensor(assigned, device=probs.device), c).to(probs.dtype)


def aux_conf_target(logits: torch.Tensor, weak: torch.Tensor, alpha: float) -> torch.Tensor:
    """The auxiliary-confidence target ``(1 - alpha) * weak + alpha * hardened(student)``.

    The hardened student labels are detached and use the class prior of ``weak`` over
    this batch: ``harden_binary`` for two classes (the paper's exact rule),
    ``harden_to_prior`` otherwise.

    Args:
        logits: ``[N, C]`` student logits.
        weak: ``[N, C]`` weak-supervisor probabilities.
        alpha: the weight on the student's own hardened labels.

    Returns:
        ``[N, C]`` target probabilities (no gradient).
    """
    with torch.no_grad():
        probs = torch.softmax(logits.float(), dim=-1)
        prior = weak.float().mean(dim=0)
        hard = harden_binary(probs, prior) if probs.shape[-1] == 2 else harden_to_prior(probs, prior)
        return (1 - alpha) * weak.float() + alpha * hard


def aux_conf_loss(logits: torch.Tensor, weak: torch.Tensor, alpha: float) -> torch.Tensor:
    """Auxiliary-confidence loss of Burns et al. 2023 (``logconf_loss_fn``), per example.

    Cross-entropy against ``aux_conf_target``: the student is pulled towards the weak
    labels and, with weight ``alpha``, towards its own confident predictions, so it can
    disagree with the supervisor (https://arxiv.org/abs/2312.09390, section 4.3.2).
    The threshold depends on the whole batch: the result for one example changes with
    the other examples in the batch. The paper's training loop stacks the logits of all
    its micro-batches and applies this loss once per optimizer step (batch size 32).

    Args:
        logits: ``[N, C]`` student logits.
        weak: ``[N, C]`` weak-supervisor probabilities.
        alpha: the weight on the hardened student labels (see ``aux_alpha``).

    Returns:
        ``[N]`` per-example loss.
    """
    return soft_label_ce(logits, aux_conf_target(logits, weak, alpha))


# --------------------------------------------------------------------------------------
# Product loss
# --------------------------------------------------------------------------------------


def product_target(logits: torch.Tensor, weak: torch.Tensor, alpha: float = 1.0, beta: float = 1.0) -> torch.Tensor:
    """The product-of-experts target ``p_student^beta * weak^alpha``, renormalized, detached.

    Computed in log space, ``softmax(beta * log p_student + alpha * log weak)``, so small
    probabilities do not underflow; a class the weak labels give probability 0 gets 0.

    Args:
        logits: ``[N, C]`` student logits.
        weak: ``[N, C]`` weak-supervisor probabilities.
        alpha: exponent on the weak labels.
        beta: exponent on the student's probabilities.

    Returns:
        ``[N, C]`` target probabilities (no gradient).
    """
    with torch.no_grad():
        score = beta * F.log_softmax(logits.float(), dim=-1)
        if alpha != 0:
            score = score + alpha * torch.log(weak.float())
        return torch.softmax(score, dim=-1)


def product_loss(logits: torch.Tensor, weak: torch.Tensor, alpha: float = 1.0, beta: float = 1.0) -> torch.Tensor:
    """Product loss of Burns et al. 2023 (``product_loss_fn``), per example.

    Cross-entropy against ``product_target``: the weak label and the student's belief
    are combined as independent experts (https://arxiv.org/abs/2312.09390, appendix).

    Args:
        logits: ``[N, C]`` student logits.
        weak: ``[N, C]`` weak-supervisor probabilities.
        alpha: exponent on the weak labels.
        beta: exponent on the student's probabilities.

    Returns:
        ``[N]`` per-example loss.
    """
    return soft_label_ce(logits, product_target(logits, weak, alpha, beta))


# --------------------------------------------------------------------------------------
# Token-level distillation for generation
# --------------------------------------------------------------------------------------


def token_distill(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    kind: DistillKind = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token-level distillation loss over output tokens.

    Position ``t`` predicts token ``t + 1`` (as in SFT): the logits at ``t`` are compared
    where ``labels[t + 1] != -100``. Both logits are divided by ``temperature`` before
    the softmax, with no ``temperature**2`` rescaling (as TRL's GKD trainer).

    Args:
        student_logits: ``[B, T, V]`` student outputs.
        teacher_logits: ``[B, T, V]`` teacher outputs; a frozen teacher's carry no gradient.
        labels: ``[B, T]`` target ids, ``-100`` where no loss is taken.
        kind: ``forward_kl``, ``reverse_kl`` or ``jsd`` (see ``token_divergence``).
        beta: the JSD interpolation weight.
        temperature: softmax temperature, > 0.

    Returns:
        ``(sum, count)``: the divergence summed over output tokens, and their number.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    mask = labels[:, 1:] != IGNORE_INDEX
    student = F.log_softmax(student_logits[:, :-1, :].float()[mask] / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits[:, :-1, :].float()[mask] / temperature, dim=-1)
    return token_divergence(student, teacher, kind, beta).sum(), mask.sum()
