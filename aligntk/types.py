"""The data types and component protocols shared by the engine and every plugin.

A component is a small class registered under a name. It declares its options as a
pydantic model in ``Config`` and is built as ``Component(config)``. The recipe names
the component; the engine calls it directly. Nothing here knows any method.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Protocol, Union, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

#: A collated micro-batch: tensors keyed by field name (``input_ids`` ``[B, T]`` ...).
Batch = dict[str, Any]
#: One example as a data component prepares it (token id lists, reference text ...).
Example = dict[str, Any]


def _members(annotation: Any) -> list[Any]:
    """The types a value may have: ``Annotated`` and unions unwrapped."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _members(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _members(arg)]
    return [annotation]


def _number_wanted(annotation: Any) -> str | None:
    """``'an integer'`` or ``'a number'`` when ``annotation`` takes an int or float but no bool."""
    members = _members(annotation)
    for m in members:
        if m in (bool, Any, object) or (
            typing.get_origin(m) is Literal and any(isinstance(a, bool) for a in typing.get_args(m))
        ):
            return None
    if float in members:
        return "a number"
    return "an integer" if int in members else None


def _bool_for_number(annotation: Any, value: Any, where: tuple[str, ...] = ()) -> str | None:
    """What is wrong when ``value`` holds a bool where ``annotation`` wants a number, else None."""
    if isinstance(value, bool):
        wanted = _number_wanted(annotation)
        if wanted is None:
            return None
        return f"expected {wanted}" if not where else f"expected {wanted} at item {'.'.join(where)}, got {value!r}"
    if not isinstance(value, (list, tuple, dict)):
        return None
    for member in _members(annotation):
        origin, args = typing.get_origin(member), typing.get_args(member)
        if isinstance(value, dict) and origin in (dict, Mapping) and len(args) == 2:
            pairs = [(str(k), args[1], v) for k, v in value.items()]
        elif isinstance(value, (list, tuple)) and origin in (list, tuple, set, frozenset, Sequence) and args:
            fixed = origin is tuple and args[-1] is not Ellipsis  # tuple[float, float], not tuple[int, ...]
            items = list(enumerate(value))[: len(args) if fixed else None]
            pairs = [(str(i), args[i] if fixed else args[0], v) for i, v in items]
        else:
            continue
        for key, inner, item in pairs:
            problem = _bool_for_number(inner, item, (*where, key))
            if problem is not None:
                return problem
    return None


def reject_bool_for_number(cls: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    """A ``mode="before"`` field validator: a bool is not a number here.

    Pydantic's lax mode reads ``True`` as ``1``, so ``max_steps: true`` would train one
    step. Every field typed int or float (alone, in a union without bool, or inside a
    list or dict) refuses bools; an int still passes where a float is wanted.
    """
    assert info.field_name is not None
    problem = _bool_for_number(cls.model_fields[info.field_name].annotation, value)
    if problem is not None:
        raise ValueError(problem)
    return value


class ComponentConfig(BaseModel):
    """Base for component options: unknown keys and bools for numbers are errors; assignments are checked."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    _no_bool_for_numbers = field_validator("*", mode="before")(reject_bool_for_number)


@dataclass
class LossOutput:
    """What a loss returns for one micro-batch.

    Attributes:
        sum: scalar tensor, the loss summed over the units of this micro-batch (never a mean).
        count: scalar tensor, the number of units (tokens or sequences) in the sum. It must
            equal ``loss.count(batch)``; the engine divides by the count over the global batch.
        metrics: scalar tensors summed over the same units (the engine reports ``value /
            count``), or ``(sum, count)`` pairs for a metric with units of its own (a
            per-sequence reward in a per-token loss); both are averaged over the global batch.
    """

    sum: torch.Tensor
    count: torch.Tensor
    metrics: dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class Models(Mapping[str, torch.nn.Module]):
    """The models of a run by role: ``policy`` (trained) and frozen ones a loss declares.

    Frozen models (``reference``, ``teacher``, ``reward`` ...) are wrapped so that calling
    them runs in eval mode under ``torch.no_grad()``.
    """

    def __init__(self, models: Mapping[str, torch.nn.Module], heads: Mapping[str, torch.nn.Module] | None = None):
        self._models = dict(models)
        #: Trainable heads the losses declared (``LossComponent.heads``), by name.
        self.heads: dict[str, torch.nn.Module] = dict(heads or {})

    def __getitem__(self, role: str) -> torch.nn.Module:
        try:
            return self._models[role]
        except KeyError:
            raise KeyError(f"no model with role {role!r}; this run has {sorted(self._models)}") from None

    def __iter__(self):
        return iter(self._models)

    def __len__(self) -> int:
        return len(self._models)

    @property
    def policy(self) -> torch.nn.Module:
        return self["policy"]

    def release(self, role: str) -> None:
        """Drop a frozen model the run no longer calls (the engine frees cached roles)."""
        if role == "policy":
            raise ValueError("the policy cannot be released")
        del self._models[role]


@dataclass
class DataReport:
    """What a data component read: rows per split, rows skipped on purpose by reason, and
    unknown tokens per file.

    ``unknown_tokens`` maps a data file to ``{"unknown": n, "tokens": total}``: how many of
    the tokens of its examples (every field ending in ``input_ids``) are the tokenizer's
    unknown token. A tokenizer without one (byte-level BPE) leaves it empty.
    """

    rows: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    unknown_tokens: dict[str, dict[str, int]] = field(default_factory=dict)

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n


@dataclass
class DataSplits:
    """The examples a data component prepared. ``eval`` may be empty."""

    train: Sequence[Example]
    eval: Sequence[Example] = ()
    report: DataReport = field(default_factory=DataReport)


@dataclass
class DataContext:
    """What the engine hands a data component at setup."""

    tokenizer: PreTrainedTokenizerBase
    seed: int
    run_dir: Path | None = None
    #: The recipe's ``rewards``: ``(weight, reward component)`` pairs, for rollout data.
    rewards: list[tuple[float, Any]] = field(default_factory=list)
    #: The name of each of ``rewards`` (registered name or Python function name), for ``reward/<name>`` metrics.
    reward_names: list[str] = field(default_factory=list)


@dataclass
class LossContext:
    """What the engine hands a loss that declares ``setup`` (``LossCapabilities.setup``)."""

    tokenizer: PreTrainedTokenizerBase
    seed: int
    #: The data component's examples (train and eval), as its ``collate`` gets them.
    splits: DataSplits
    device: torch.device


# --------------------------------------------------------------------------------------
# Capabilities: what a component needs and provides beyond the protocol's members,
# declared in one typed place per kind and read once, when the recipe is validated.
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataCapabilities:
    """What a data component declares with ``capabilities(config)`` (a classmethod; optional).

    Attributes:
        provides: the batch fields ``collate`` returns with these options (default: the
            class's ``provides``); packed SFT batches carry ``position_ids`` instead of an
            attention mask, for example.
        example_fields: the fields every example holds, for evaluators' ``requires``
            (``None``: not declared, checked when the evaluator runs).
        online: the component samples from the current policy: it defines
            ``rollout(models, examples) -> examples``, which the engine calls for each
            training micro-batch before ``collate`` (eval mode, no grad), and has no fixed
            evaluation loss. Each example it gets has an int ``sample_seed`` to sample from,
            a function of the run's seed, the rollout and the example only.
        iterations: online data only: optimizer steps on each batch of rollouts before
            sampling again; the batches are checkpointed, so a resume inside a block is exact.
    """

    provides: frozenset[str] | None = None
    example_fields: frozenset[str] | None = None
    online: bool = False
    iterations: int = 1


@dataclass(frozen=True)
class LossCapabilities:
    """What a loss declares with ``capabilities(config)`` (a classmethod; optional).

    Attributes:
        precompute: the loss defines ``precompute(models, batch) -> dict[str, Tensor [B]]``
            for what a frozen model computes once per example; the engine runs it once over
            every example, keeps the results in the run folder's ``cache/`` and adds them to
            each batch under the returned names.
        live_roles: the roles its steps still call (default: every role in ``roles``);
            after precomputing, the engine frees the frozen models no loss calls.
        heads: the loss defines ``heads(model) -> dict[str, nn.Module]``, small trainable
            modules trained, clipped, checkpointed and saved with the policy and handed to
            losses and data as ``models.heads[name]`` (PPO's value head).
        whole_batch: the loss needs the whole global batch in one call (a statistic over
            the batch); the engine refuses ``train.grad_accum > 1`` and several processes.
        scheduled: the loss defines ``start_step(step, max_steps)``, called before each
            optimizer step (``step`` from 1), for a value that follows the schedule.
        setup: the loss defines ``setup(ctx: LossContext)``, called once on every process
            after the data is loaded and before anything is precomputed or trained (also on
            resume), for what it fits on the training examples (BCO's UDM classifier).
    """

    precompute: bool = False
    live_roles: tuple[str, ...] | None = None
    heads: bool = False
    whole_batch: bool = False
    scheduled: bool = False
    setup: bool = False


@dataclass(frozen=True)
class EvaluatorCapabilities:
    """What an evaluator declares with ``capabilities(config)`` (a classmethod; optional).

    Attributes:
        requires: the example fields it reads; checked against the data component's
            ``example_fields`` when the recipe is validated.
        samples: it keeps a few of its latest call's generations, returned by
            ``samples() -> list[Sample]``; the engine writes them to ``samples.jsonl``
            after each evaluation, where logging sinks read them.
    """

    requires: frozenset[str] = frozenset()
    samples: bool = False


@dataclass
class Sample:
    """One generation an evaluator shows at an evaluation (``samples.jsonl``, logging sinks).

    Attributes:
        prompt: the text the model was given.
        completion: what the model generated.
        reference: the expected answer, when the data has one.
        score: the evaluator's score of this one completion (1.0 / 0.0 for exact match).
    """

    prompt: str
    completion: str
    reference: str | None = None
    score: float | None = None


@runtime_checkable
class DataComponent(Protocol):
    """Turns a source into examples, and examples into batches.

    ``provides`` names the batch fields ``collate`` returns; the recipe check makes sure
    they cover what the loss ``requires`` before any model loads. Everything optional
    (fields that depend on options, online sampling) is declared in
    :class:`DataCapabilities`, returned by an optional ``capabilities(config)`` classmethod.
    """

    Config: ClassVar[type[ComponentConfig]]
    provides: ClassVar[frozenset[str]]

    def load(self, ctx: DataContext) -> DataSplits: ...

    def collate(self, examples: Sequence[Example]) -> Batch: ...


@runtime_checkable
class LossComponent(Protocol):
    """Computes a summed loss over a micro-batch.

    ``requires`` names the batch fields it reads; ``roles`` the models it needs
    (``"policy"`` always; others are loaded frozen). ``count(batch)`` gives the number of
    units in a batch without a forward pass, so the engine can normalize over the global
    batch before any backward.

    Everything optional (a precomputed cache, trainable heads, a whole-batch statistic,
    a schedule) is declared in :class:`LossCapabilities`, returned by an optional
    ``capabilities(config)`` classmethod, and the methods it names are then required.
    """

    Config: ClassVar[type[ComponentConfig]]
    requires: ClassVar[frozenset[str]]
    roles: ClassVar[tuple[str, ...]]

    def count(self, batch: Batch) -> torch.Tensor: ...

    def __call__(self, models: Models, batch: Batch) -> LossOutput: ...


@runtime_checkable
class UpdateStep(Protocol):
    """Decides which parameters move and how: preparation, optimizer and schedule.

    ``prepare`` may freeze or wrap the policy (adapters) and returns the module to train.
    A wrapper that prepends positions to every sequence (prompt tuning's soft prompt)
    returns logits aligned with its inputs and says how many it prepends in an int
    attribute ``prepended_positions``; log-prob code reads that (``prepends_positions``).
    ``configure`` builds the optimizer and learning-rate scheduler for ``total_steps``.
    ``max_grad_norm`` (or ``None``) is the clipping threshold the engine applies.
    ``penalty`` adds a regularizer to the step's loss (``None`` for none); it is called
    once per optimizer step and added before the backward of the first micro-batch.
    """

    Config: ClassVar[type[ComponentConfig]]
    max_grad_norm: float | None

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module: ...

    def configure(
        self, model: torch.nn.Module, total_steps: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]: ...

    def penalty(self, model: torch.nn.Module) -> torch.Tensor | None: ...


@runtime_checkable
class RewardComponent(Protocol):
    """Scores generated text: one float per (prompt, completion) pair, ``[N]``."""

    Config: ClassVar[type[ComponentConfig]]

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **fields: Any) -> torch.Tensor: ...


@runtime_checkable
class Evaluator(Protocol):
    """Measures a task metric on the evaluation examples (generation, accuracy ...).

    Called on the main process only, with the unwrapped policy in eval mode under
    ``torch.no_grad()``; returns metric name to value. The example fields it reads are
    declared in :class:`EvaluatorCapabilities` (an optional ``capabilities(config)``).
    One that declares ``samples`` also has ``samples() -> list[Sample]``: a few generations
    of its latest call, which the engine writes to ``samples.jsonl``.
    """

    Config: ClassVar[type[ComponentConfig]]

    def __call__(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]
    ) -> dict[str, float]: ...


@dataclass
class RunInfo:
    """What lifecycle hooks see of a run."""

    run_dir: Path
    recipe: dict[str, Any]
    max_steps: int
    start_step: int
    world_size: int
    device: str
    trainable_parameters: int
    total_parameters: int
    #: Validated recipe options of each lifecycle plugin that registered a model (``aligntk_register_options``).
    plugin_options: dict[str, Any] = field(default_factory=dict)
