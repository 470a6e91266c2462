"""The rules: plain-words findings from the measured step metrics (loss, lr, grad_norm).

Each rule is a small pure function over the recent history of logged steps, so it can
be tested on numbers written by hand. A rule returns a ``Finding`` or ``None``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt

from aligntk import ComponentConfig

Kind = Literal[
    "no_trainable_parameters",
    "stalled_learning_rate",
    "vanishing_gradient",
    "exploding_gradient",
    "schedule_ends_early",
    "loss_not_finite",
]


class DiagnosticsConfig(ComponentConfig):
    """Options, read from the recipe's ``plugins: {diagnostics: {...}}`` (``enabled: false``,
    which aligntk handles for every plugin, turns the diagnostics off).

    Attributes:
        window: logged steps the loss rule looks back over.
        tiny_lr: a learning rate at or below this counts as "tiny".
        flat_tolerance: the loss counts as flat when the mean of the window's second
            half is not below that of its first half by more than this fraction.
        vanishing_grad: a gradient norm at or below this counts as zero ...
        vanishing_steps: ... when it stays there this many logged steps in a row.
        explode_factor: a gradient norm this many times the median of the window
            before it counts as exploding (non-finite norms always do) ...
        explode_history: ... once at least this many earlier steps are known.
        stop_on: findings that also stop the run (after the step, with a checkpoint
            written as usual at the end).
    """

    window: PositiveInt = Field(10, ge=2)
    tiny_lr: NonNegativeFloat = 1e-8
    flat_tolerance: NonNegativeFloat = 0.01
    vanishing_grad: NonNegativeFloat = 1e-8
    vanishing_steps: PositiveInt = 3
    explode_factor: PositiveFloat = 10.0
    explode_history: PositiveInt = 3
    stop_on: list[Kind] = Field(default_factory=list)


@dataclass
class Finding:
    """One diagnosis: what kind, at which step, the sentence for the user, the numbers behind it."""

    kind: Kind
    step: int
    message: str
    signals: dict[str, Any] = field(default_factory=dict)


Record = dict[str, float]


def _g(x: float) -> str:
    return f"{x:.3g}"


def no_trainable_parameters(trainable: int, total: int) -> Finding | None:
    if trainable > 0:
        return None
    return Finding(
        "no_trainable_parameters",
        0,
        f"no parameter is trainable (0 of {total:,}): the update step froze everything, so training cannot "
        "change the model; loosen update.freeze / update.freeze_layers or pick another update step",
        {"trainable": trainable, "total": total},
    )


def stalled_learning_rate(history: Sequence[Record], config: DiagnosticsConfig) -> Finding | None:
    """The loss has not improved over the window while the learning rate stayed tiny or zero."""
    if len(history) < config.window:
        return None
    recent = history[-config.window :]
    lr = max(r["lr"] for r in recent)
    if lr > config.tiny_lr:
        return None
    half = len(recent) // 2
    before = statistics.fmean(r["loss"] for r in recent[:half])
    after = statistics.fmean(r["loss"] for r in recent[half:])
    if before - after > config.flat_tolerance * max(abs(before), 1e-12):
        return None
    step = int(recent[-1]["step"])
    return Finding(
        "stalled_learning_rate",
        step,
        f"the loss has stayed flat (about {_g(after)}) over the last {len(recent)} logged steps while the learning "
        f"rate was at most {_g(lr)}: the optimizer is barely moving the weights. Raise update.learning_rate, "
        "shorten the warm-up, or check that the schedule is not stuck at zero",
        {"loss_first_half": before, "loss_second_half": after, "max_lr": lr},
    )


def vanishing_gradient(history: Sequence[Record], config: DiagnosticsConfig) -> Finding | None:
    """The gradient norm stayed at (almost) zero for several logged steps."""
    recent = history[-config.vanishing_steps :]
    if len(recent) < config.vanishing_steps or any(r["grad_norm"] > config.vanishing_grad for r in recent):
        return None
    loss = recent[-1]["loss"]
    hint = (
        "the loss is exactly 0, so most likely every label is masked (-100) and no token is trained on"
        if loss == 0
        else "common causes: every label masked (-100), every parameter frozen, or a loss computed from "
        "tensors detached from the model (.detach(), torch.no_grad(), .item())"
    )
    return Finding(
        "vanishing_gradient",
        int(recent[-1]["step"]),
        f"the gradient norm has been below {_g(config.vanishing_grad)} for the last {len(recent)} logged steps "
        f"(loss {_g(loss)}): nothing is learning; {hint}",
        {"grad_norm": [r["grad_norm"] for r in recent], "loss": loss},
    )


def exploding_gradient(history: Sequence[Record], config: DiagnosticsConfig) -> Finding | None:
    """The newest gradient norm is not finite, or far above its recent median."""
    if not history:
        return None
    last = history[-1]
    norm = last["grad_norm"]
    earlier = [r["grad_norm"] for r in history[-config.window - 1 : -1] if math.isfinite(r["grad_norm"])]
    if math.isfinite(norm):
        if len(earlier) < config.explode_history:
            return None
        median = statistics.median(earlier)
        if norm <= config.explode_factor * max(median, 1e-12):
            return None
        what = f"jumped to {_g(norm)}, {_g(norm / max(median, 1e-12))} times its recent median {_g(median)}"
    else:
        median = statistics.median(earlier) if earlier else float("nan")
        what = f"is {norm} (overflow)"
    return Finding(
        "exploding_gradient",
        int(last["step"]),
        f"the gradient norm {what} at step {int(last['step'])}: training is diverging. Lower "
        "update.learning_rate, keep update.max_grad_norm set so updates are clipped, or use precision bf16 "
        "rather than fp16",
        {"grad_norm": norm, "recent_median": median, "lr": last["lr"]},
    )


def schedule_ends_early(history: Sequence[Record], max_steps: int) -> Finding | None:
    """The learning rate has fallen to zero after being positive, with steps still to run."""
    if len(history) < 2:
        return None
    last = history[-1]
    step = int(last["step"])
    if last["lr"] != 0 or step >= max_steps or not any(r["lr"] > 0 for r in history[:-1]):
        return None
    return Finding(
        "schedule_ends_early",
        step,
        f"the learning rate reached 0 at step {step} but the run goes on to step {max_steps}: the remaining "
        f"{max_steps - step} steps cannot change the weights. Make the schedule as long as the run "
        "(update.schedule_steps unset or equal to train.max_steps)",
        {"lr": last["lr"], "max_steps": max_steps},
    )


def loss_not_finite(history: Sequence[Record], error: BaseException) -> Finding:
    """The engine stopped on a NaN or infinite loss; say what the last healthy steps showed."""
    clues = []
    if history:
        first, last = history[0], history[-1]
        clues.append(
            f"over the last {len(history)} logged steps the loss went from {_g(first['loss'])} to "
            f"{_g(last['loss'])} and the gradient norm from {_g(first['grad_norm'])} to {_g(last['grad_norm'])} "
            f"(learning rate {_g(last['lr'])})"
        )
        if last["grad_norm"] > 10 * max(first["grad_norm"], 1e-12):
            clues.append("the growing gradient norm points to a learning rate that is too high")
    step = int(history[-1]["step"]) + 1 if history else 1
    return Finding(
        "loss_not_finite",
        step,
        f"the loss became NaN or infinite (around step {step}); " + "; ".join(clues or ["no step finished before"])
        + ". Lower update.learning_rate, keep gradient clipping on, prefer bf16 to fp16, and check the data",
        {"error": str(error).splitlines()[0] if str(error) else type(error).__name__},
    )
