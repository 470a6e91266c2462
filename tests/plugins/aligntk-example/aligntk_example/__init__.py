"""An example third-party aligntk plugin, built only on aligntk's public API.

* loss ``label_smoothed_sft``: token cross-entropy with label smoothing on the
  output tokens (Szegedy et al. 2016, https://arxiv.org/abs/1512.00567, section 7).
* lifecycle hook ``aligntk_on_step_end``: records each step in ``STEPS``, so a
  test can see that lifecycle hooks reach third-party plugins.
* benchmark suite ``example-smoothing`` (``suite/suite.yaml``): plain SFT against the
  label-smoothed loss on a tiny model, run by ``aligntk bench example-smoothing``.

Its pyproject needs only ``[project.entry-points.aligntk] example = "aligntk_example"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import click
import torch
from pydantic import Field

from aligntk import IGNORE_INDEX, Batch, ComponentConfig, LossOutput, Models, hookimpl

__all__ = ["LabelSmoothedSFTLoss", "LabelSmoothedSFTLossConfig", "STEPS", "label_smoothed_nll"]

#: Steps seen by ``aligntk_on_step_end``, in order (main process only).
STEPS: list[int] = []


def label_smoothed_nll(
    logits: torch.Tensor, labels: torch.Tensor, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed label-smoothed next-token cross-entropy over labelled positions.

    Per token: ``(1 - epsilon) * -log p(y) + epsilon * mean_v(-log p(v))``, the
    cross-entropy against a target that puts ``1 - epsilon`` on the label and spreads
    ``epsilon`` uniformly over the vocabulary (as ``torch.nn.functional.cross_entropy``
    with ``label_smoothing``). Position ``t`` predicts label ``t + 1``; labels equal to
    ``-100`` contribute nothing. Logits are upcast to float32 before the softmax.

    Args:
        logits: ``[B, T, V]`` model outputs.
        labels: ``[B, T]`` target ids, ``-100`` where no loss is taken.
        epsilon: smoothing weight in ``[0, 1)``.

    Returns:
        ``(sum, nll_sum, count)``: the summed smoothed loss and plain negative
        log-likelihood (scalars), and the number of labelled tokens.
    """
    shift_labels = labels[:, 1:]
    keep = shift_labels != IGNORE_INDEX  # [B, T-1]
    # Select labelled positions first: ignored ones never enter the softmax, so they get no gradient.
    logprobs = torch.log_softmax(logits[:, :-1, :][keep].float(), dim=-1)  # [N, V]
    nll = -logprobs.gather(-1, shift_labels[keep].unsqueeze(-1)).squeeze(-1)  # [N]
    uniform = -logprobs.mean(dim=-1)  # [N]
    loss = (1.0 - epsilon) * nll + epsilon * uniform
    return loss.sum(), nll.sum(), keep.sum()


class LabelSmoothedSFTLossConfig(ComponentConfig):
    """Options of ``label_smoothed_sft``."""

    #: Probability mass spread uniformly over the vocabulary; 0 is plain SFT.
    epsilon: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1


class LabelSmoothedSFTLoss:
    """Label-smoothed ``-log Pr(y | x)`` summed over output tokens; the engine divides by the count.

    Reports ``nll`` (the unsmoothed loss) as a metric, so runs compare with plain SFT.
    """

    Config = LabelSmoothedSFTLossConfig
    requires = frozenset({"input_ids", "attention_mask", "labels"})
    roles = ("policy",)

    def __init__(self, config: LabelSmoothedSFTLossConfig):
        self.config = config

    def count(self, batch: Batch) -> torch.Tensor:
        return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()

    def __call__(self, models: Models, batch: Batch) -> LossOutput:
        out = models.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        loss_sum, nll_sum, count = label_smoothed_nll(out.logits, batch["labels"], self.config.epsilon)
        return LossOutput(sum=loss_sum, count=count, metrics={"nll": nll_sum.detach()})


@hookimpl
def aligntk_register_losses(register: Any) -> None:
    register("label_smoothed_sft", LabelSmoothedSFTLoss)


@hookimpl
def aligntk_on_step_end(run: Any, step: int, metrics: dict[str, float]) -> None:
    STEPS.append(step)


@click.command("example-echo")
@click.argument("words", nargs=-1)
def echo(words: tuple[str, ...]) -> None:
    """Print WORDS back (a command a plugin adds to `aligntk`)."""
    click.echo("example: " + " ".join(words))


@hookimpl
def aligntk_register_commands(cli: Any) -> None:
    cli.add_command(echo)


@hookimpl
def aligntk_register_suites(register: Any) -> None:
    register("example-smoothing", Path(__file__).parent / "suite" / "suite.yaml")
