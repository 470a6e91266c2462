"""Offline preference-optimization losses as pure tensor functions (float32 math, float64 kept).

Every function returns one value per preference pair (``[B]``); the loss components sum
them and let the engine divide by the number of pairs over the global batch.

Conventions follow TRL 1.16 so that results are comparable:

* ``sequence_logps`` shifts by one (position ``t`` predicts label ``t + 1``) and sums the
  log-probabilities of the labelled tokens (label ``-100`` is ignored).
* IPO divides each log-ratio by the number of completion tokens before taking the squared
  loss (TRL ``DPOTrainer``, loss_type ``ipo``; confirmed there with the IPO authors).
* SimPO takes length-averaged log-probabilities (TRL ``CPOTrainer``, loss_type ``simpo``).
* The f-divergence of f-DPO replaces each log-ratio ``u`` by ``f'(exp u)`` in the losses built on
  the chosen-minus-rejected difference (``DIVERGENCE_LOSS_TYPES``), as TRL's ``f_divergence_type``.

Inputs of half precision are upcast to float32; float64 inputs stay float64 (the TRL parity
tests run in float64).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from aligntk import IGNORE_INDEX, logps_from_logits

LossType = Literal[
    "sigmoid",
    "ipo",
    "hinge",
    "robust",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
    "sft",
]
LOSS_TYPES: tuple[str, ...] = get_args(LossType)
#: The per-pair types ``preference_loss`` computes (``sft`` is a token mean, in the ``dpo`` component).
PAIR_LOSS_TYPES: tuple[str, ...] = tuple(t for t in LOSS_TYPES if t != "sft")
#: Types that sort the batch (AOT): a statistic over the whole batch.
BATCH_LOSS_TYPES: frozenset[str] = frozenset({"aot", "aot_unpaired"})

FDivergence = Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]
F_DIVERGENCES: tuple[str, ...] = get_args(FDivergence)
#: The types built on the chosen-minus-rejected reward difference: the only ones with an f-DPO form
#: (TRL rejects the others with a non-default divergence; so does the ``dpo`` config).
DIVERGENCE_LOSS_TYPES: frozenset[str] = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
)


def up(x: torch.Tensor) -> torch.Tensor:
    """``x`` upcast to float32 unless it is float64 already (losses never compute in half precision)."""
    return x if x.dtype == torch.float64 else x.float()


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each sequence's labelled tokens (the plain path, ``aligntk.logps_from_logits``).

    Logits are upcast to float32 before the log-softmax.

    Args:
        logits: ``[B, T, V]`` model outputs.
        labels: ``[B, T]`` target ids aligned with the inputs, ``-100`` where no loss is taken.

    Returns:
        ``[B]`` float32: ``sum_t log p(labels[t + 1] | inputs[:t + 1])`` over labelled ``t + 1``.
    """
    return logps_from_logits(logits, labels).logps.sum(-1)


def label_counts(labels: torch.Tensor) -> torch.Tensor:
    """Number of labelled (predicted) tokens per sequence.

    Args:
        labels: ``[B, T]`` target ids, ``-100`` where no loss is taken.

    Returns:
        ``[B]`` int64; the first position is never predicted, so it never counts.
    """
    return (labels[:, 1:] != IGNORE_INDEX).sum(-1)


def implicit_rewards(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's implicit rewards ``beta * (log pi(y|x) - log pi_ref(y|x))``, detached.

    Args:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: ``[B]`` sequence log-probs.
        beta: the KL coefficient.

    Returns:
        ``(chosen, rejected)``, each ``[B]`` float32.
    """
    chosen = beta * (up(policy_chosen) - up(ref_chosen))
    rejected = beta * (up(policy_rejected) - up(ref_rejected))
    return chosen.detach(), rejected.detach()


def f_divergence_scores(
    logratio: torch.Tensor, divergence: FDivergence = "reverse_kl", alpha: float = 0.5
) -> torch.Tensor:
    """f-DPO's reward ``f'(π / π_ref)`` from a log-ratio ``u = log π - log π_ref`` (Wang et al. 2023,
    https://arxiv.org/abs/2309.16240, Table 1), as TRL's ``f_divergence_type``.

    * ``reverse_kl``: ``u`` (plain DPO);
    * ``forward_kl``: ``1 - exp(-u)``;
    * ``js_divergence``: ``log 2 + log σ(u)``;
    * ``alpha_divergence``: ``(exp((α - 1) u) - 1) / (α - 1)``, the exponent clamped at 80 as TRL
      does (``u`` itself at ``α = 1``).

    Args:
        logratio: ``[B]`` sequence log-ratios.
        divergence: which f-divergence regularizes the policy.
        alpha: the α of the α-divergence (TRL's ``f_alpha_divergence_coef``, default 0.5).

    Returns:
        ``[B]`` scores, same dtype as ``logratio``.
    """
    if divergence == "reverse_kl":
        return logratio
    if divergence == "forward_kl":
        return 1 - torch.exp(-logratio)
    if divergence == "js_divergence":
        return math.log(2) + F.logsigmoid(logratio)
    if divergence == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return logratio
        t = torch.clamp((alpha - 1.0) * logratio, max=80.0)
        return (torch.exp(t) - 1.0) / (alpha - 1.0)
    raise ValueError(f"unknown f_divergence_type {divergence!r}; expected one of {', '.join(F_DIVERGENCES)}")


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: LossType = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    f_divergence: FDivergence = "reverse_kl",
    f_alpha: float = 0.5,
    discopop_tau: float = 0.05,
) -> torch.Tensor:
    """Per-pair loss of the DPO family, from sequence log-probabilities (TRL 1.16 ``DPOTrainer``).

    With log-ratios ``u_c = policy_chosen - ref_chosen``, ``u_r = policy_rejected - ref_rejected``,
    scores ``s = f'(exp u)`` (``f_divergence_scores``; ``s = u`` for the default reverse KL),
    ``d = s_c - s_r`` and ``eps = label_smoothing``:

    * ``sigmoid``: DPO, ``-log σ(β d)`` (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290).
      With ``eps > 0`` it is conservative DPO (cDPO, https://ericmitchell.ai/cdpo.pdf):
      ``-(1 - eps) log σ(β d) - eps log σ(-β d)`` (TRL's ``sigmoid`` ignores ``eps``).
    * ``robust``: robust DPO (Chowdhury et al. 2024, https://arxiv.org/abs/2403.00409):
      ``(-(1 - eps) log σ(β d) + eps log σ(-β d)) / (1 - 2 eps)`` (``0 <= eps < 0.5``).
    * ``hinge``: SLiC (Zhao et al. 2023, https://arxiv.org/abs/2305.10425), ``max(0, 1 - β d)``.
    * ``ipo``: IPO (Azar et al. 2023, https://arxiv.org/abs/2310.12036, eq. 17)
      ``(d' - 1 / (2β))^2`` with ``d' = s_c / chosen_lengths - s_r / rejected_lengths`` (TRL's
      length normalization); without lengths ``d' = d``.
    * ``sigmoid_norm``: ``-log σ(β d')`` on the same length-normalized ``d'``.
    * ``exo_pair``: EXO (Ji et al. 2024, https://arxiv.org/abs/2402.00856, eq. 16),
      ``q log(q / (1 - eps)) + (1 - q) log((1 - q) / eps)`` with ``q = σ(β d)``; needs ``eps > 0``.
    * ``nca_pair``: NCA (Chen et al. 2024, https://arxiv.org/abs/2402.05369),
      ``-log σ(β u_c) - ½ log σ(-β u_c) - ½ log σ(-β u_r)``.
    * ``bco_pair``: BCO on pairs (Jung et al. 2024, https://arxiv.org/abs/2404.04656) without the
      running reward mean, ``-log σ(β u_c) - log σ(-β u_r)``.
    * ``sppo_hard``: SPPO with hard probabilities (Wu et al. 2024, https://arxiv.org/abs/2405.00675),
      ``(u_c - 1/(2β))^2 + (u_r + 1/(2β))^2``.
    * ``aot``: AOT (Melnyk et al. 2024, https://arxiv.org/abs/2406.05882): ``cDPO`` on
      ``sort(pc - pr) - sort(rc - rr)``, sorted over the batch; ``aot_unpaired``: on
      ``sort(u_c) - sort(u_r)``. The result is per sorted position, not per pair.
    * ``apo_zero``: APO (D'Oosterlinck et al. 2024, https://arxiv.org/abs/2408.06266, eq. 7),
      ``1 - σ(β u_c) + σ(β u_r)``; ``apo_down`` (eq. 8): ``σ(β u_c) + 1 - σ(β (u_c - u_r))``.
    * ``discopop``: DiscoPOP (Chris Lu et al. 2024, https://arxiv.org/abs/2406.08414, eq. 5), with
      ``z = β d`` and ``m = σ(z / τ)``: ``(1 - m) (-log σ(z)) + m exp(-z)``.

    Args:
        policy_chosen, policy_rejected: ``[B]`` policy sequence log-probs.
        ref_chosen, ref_rejected: ``[B]`` reference sequence log-probs.
        beta: the KL coefficient (IPO's ``τ``).
        loss_type: one of ``PAIR_LOSS_TYPES``.
        label_smoothing: ``eps`` (``sigmoid``, ``robust``, ``exo_pair``, ``aot``, ``aot_unpaired``).
        chosen_lengths, rejected_lengths: ``[B]`` completion token counts (``ipo``, ``sigmoid_norm``).
        f_divergence, f_alpha: the f-divergence (``DIVERGENCE_LOSS_TYPES`` only) and its α.
        discopop_tau: DiscoPOP's temperature τ.

    Returns:
        ``[B]`` per-pair losses (float32, or float64 for float64 inputs).
    """
    if f_divergence != "reverse_kl" and loss_type not in DIVERGENCE_LOSS_TYPES:
        raise ValueError(
            f"f_divergence_type {f_divergence!r} needs a loss_type built on the chosen-rejected difference "
            f"({', '.join(sorted(DIVERGENCE_LOSS_TYPES))}), got {loss_type!r}"
        )
    pc, pr, rc, rr = up(policy_chosen), up(policy_rejected), up(ref_chosen), up(ref_rejected)
    u_c, u_r = pc - rc, pr - rr
    s_c, s_r = f_divergence_scores(u_c, f_divergence, f_alpha), f_divergence_scores(u_r, f_divergence, f_alpha)
    delta = s_c - s_r
    eps = label_smoothing

    def smoothed(z: torch.Tensor) -> torch.Tensor:
        return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)

    def normalized() -> torch.Tensor:
        if chosen_lengths is None or rejected_lengths is None:
            return delta
        return s_c / chosen_lengths.clamp(min=1).to(s_c.dtype) - s_r / rejected_lengths.clamp(min=1).to(s_r.dtype)

    if loss_type == "sigmoid":
        return smoothed(beta * delta)
    if loss_type == "robust":
        if not 0.0 <= eps < 0.5:
            raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {eps}")
        clean = -(1 - eps) * F.logsigmoid(beta * delta)
        flipped = -eps * F.logsigmoid(-beta * delta)
        return (clean - flipped) / (1 - 2 * eps)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type == "ipo":
        return (normalized() - 1 / (2 * beta)) ** 2
    if loss_type == "sigmoid_norm":
        return -F.logsigmoid(beta * normalized())
    if loss_type == "exo_pair":
        if not 0.0 < eps < 1.0:
            raise ValueError(f"exo_pair needs 0 < label_smoothing < 1 (the EXO paper uses 1e-3), got {eps}")
        z = beta * delta
        q_w, q_l = torch.sigmoid(z), torch.sigmoid(-z)
        return q_w * (F.logsigmoid(z) - math.log1p(-eps)) + q_l * (F.logsigmoid(-z) - math.log(eps))
    if loss_type == "nca_pair":
        return -F.logsigmoid(beta * u_c) - 0.5 * F.logsigmoid(-beta * u_c) - 0.5 * F.logsigmoid(-beta * u_r)
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * u_c) - F.logsigmoid(-beta * u_r)
    if loss_type == "sppo_hard":
        return (u_c - 0.5 / beta) ** 2 + (u_r + 0.5 / beta) ** 2
    if loss_type == "aot":
        sorted_delta = torch.sort(pc - pr, dim=0).values - torch.sort(rc - rr, dim=0).values
        return smoothed(beta * sorted_delta)
    if loss_type == "aot_unpaired":
        return smoothed(beta * (torch.sort(u_c, dim=0).values - torch.sort(u_r, dim=0).values))
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(beta * u_c) + torch.sigmoid(beta * u_r)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * u_c) + 1 - torch.sigmoid(beta * (u_c - u_r))
    if loss_type == "discopop":
        z = beta * delta
        modulation = torch.sigmoid(z / discopop_tau)
        return -F.logsigmoid(z) * (1 - modulation) + torch.exp(-z) * modulation
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(PAIR_LOSS_TYPES)}")


def simpo_loss(
    policy_chosen_avg: torch.Tensor,
    policy_rejected_avg: torch.Tensor,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-pair SimPO loss (Meng et al. 2024, https://arxiv.org/abs/2405.14734, eq. 6).

    Reference-free, on length-averaged log-probs, with a target margin ``gamma``:
    ``-log σ(β (avg_chosen - avg_rejected) - γ)``; with ``label_smoothing = eps`` the
    conservative form ``-(1 - eps) log σ(z) - eps log σ(-z)`` (as TRL ``CPOTrainer``).

    Args:
        policy_chosen_avg, policy_rejected_avg: ``[B]`` mean per-token log-probs of the
            chosen and rejected completions (``sequence_logps / label_counts``).
        beta: the reward scale.
        gamma: the target reward margin.
        label_smoothing: the assumed rate of flipped labels.

    Returns:
        ``[B]`` float32 per-pair losses.
    """
    z = beta * (up(policy_chosen_avg) - up(policy_rejected_avg)) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


CPOLossType = Literal["sigmoid", "hinge", "ipo", "simpo"]
CPO_LOSS_TYPES: tuple[str, ...] = get_args(CPOLossType)


def cpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    beta: float,
    loss_type: CPOLossType = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
) -> torch.Tensor:
    """Per-pair CPO preference term (Xu et al. 2024, https://arxiv.org/abs/2401.08417, eq. 3), as TRL's
    ``CPOTrainer.cpo_loss``; reference-free.

    With rewards ``r = log π(y|x)`` (or AlphaPO's ``(1 - π(y|x)^-α) / α`` for ``alpha != 0``,
    Gupta et al. 2025, https://arxiv.org/abs/2501.03884) and ``z = r_c - r_r``:

    * ``sigmoid``: ``-(1 - eps) log σ(β z) - eps log σ(-β z)``;
    * ``simpo``: the same on ``z - γ / β`` (SimPO's margin; inputs are length-averaged);
    * ``hinge``: ``max(0, 1 - β z)``;
    * ``ipo``: ``(z - 1 / (2β))^2`` (inputs length-averaged).

    Args:
        policy_chosen, policy_rejected: ``[B]`` policy log-probs: summed for ``sigmoid`` and
            ``hinge``, length-averaged for ``ipo`` and ``simpo`` (as TRL's ``CPOTrainer``).
        beta: the temperature.
        loss_type: one of ``CPO_LOSS_TYPES``.
        label_smoothing: ``eps`` (``sigmoid``, ``simpo``).
        simpo_gamma: SimPO's target margin γ.
        alpha: AlphaPO's α (0: plain log-prob rewards).

    Returns:
        ``[B]`` per-pair losses.
    """
    pc, pr = up(policy_chosen), up(policy_rejected)
    if alpha != 0.0:
        pc, pr = (1 - torch.exp(pc).pow(-alpha)) / alpha, (1 - torch.exp(pr).pow(-alpha)) / alpha
    z = pc - pr
    eps = label_smoothing
    if loss_type == "simpo":
        z = z - simpo_gamma / beta
    if loss_type in ("sigmoid", "simpo"):
        return -F.logsigmoid(beta * z) * (1 - eps) - F.logsigmoid(-beta * z) * eps
    if loss_type == "hinge":
        return torch.relu(1 - beta * z)
    if loss_type == "ipo":
        return (z - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(CPO_LOSS_TYPES)}")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable on both sides of ``-log 2`` (Mächler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def odds_ratio_loss(policy_chosen_avg: torch.Tensor, policy_rejected_avg: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair ORPO odds-ratio term ``-β log σ(log odds(y_c) - log odds(y_r))`` (Hong et al. 2024,
    https://arxiv.org/abs/2403.07691, eqs. 4 and 7), ``odds(y) = P / (1 - P)`` on the length-averaged
    log-probability, as TRL's ``ORPOTrainer.odds_ratio_loss`` (which returns its negation).

    Args:
        policy_chosen_avg, policy_rejected_avg: ``[B]`` mean per-token log-probs (``< 0``).
        beta: the weight λ of the odds-ratio term.

    Returns:
        ``[B]`` per-pair losses.
    """
    pc, pr = up(policy_chosen_avg), up(policy_rejected_avg)
    log_odds = (pc - pr) - (log1mexp(pc) - log1mexp(pr))
    return -beta * F.logsigmoid(log_odds)


def bradley_terry_loss(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-pair Bradley–Terry reward-model loss ``-log σ(r_c - r_r - margin)``.

    The margin form is Llama 2's (Touvron et al. 2023, https://arxiv.org/abs/2307.09288, eq. 2);
    without a margin it is the InstructGPT loss (https://arxiv.org/abs/2203.02155, eq. 1).

    Args:
        r_chosen, r_rejected: ``[B]`` scalar rewards of the chosen and rejected sequences.
        margin: ``[B]`` how much better the chosen is known to be (``None``: 0).

    Returns:
        ``[B]`` float32 per-pair losses.
    """
    diff = r_chosen.float() - r_rejected.float()
    if margin is not None:
        diff = diff - margin.float()
    return -F.logsigmoid(diff)
