"""Where each optimizer step's batches come from: static data, or rollouts from the current policy.

The engine picks one of two implementations once, at setup, from what the data
component declares (:class:`~aligntk.types.DataCapabilities`), and the step and the loop
never ask which they have:

* :class:`StaticBatches`: examples prepared once. Each step's global batch is a pure
  function of (seed, step), and what frozen models compute once per example (the
  losses' ``precompute``) is cached in the run folder and added to every batch.
* :class:`OnlineBatches`: each micro-batch's examples are handed to the data
  component's ``rollout`` (sampling from the current policy) before collation; with
  ``iterations = k`` the same rollouts serve ``k`` optimizer steps, and the block in use
  is part of the checkpoint, so a resume inside a block is exact.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import AligntkError
from .precision import Precision
from .seeds import sample_seed
from .types import Batch, DataCapabilities, DataSplits, Example, LossCapabilities, LossComponent, Models

log = logging.getLogger("aligntk")


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def global_batch_indices(step: int, n: int, size: int, seed: int) -> list[int]:
    """Example indices of the global batch for optimizer step ``step`` (0-based).

    The training stream is one shuffled pass after another with a fresh order per
    epoch, cut into consecutive global batches; a batch may straddle two epochs.
    Nothing is dropped, and the batch is a pure function of the step, which is what
    makes resume exact without saving any data-loader state.
    """
    out: list[int] = []
    position = step * size
    while len(out) < size:
        epoch, offset = divmod(position + len(out), n)
        take = min(size - len(out), n - offset)
        out.extend(_permutation(n, seed, epoch)[offset : offset + take])
    return out


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@dataclass
class Layout:
    """How examples are cut into batches: sizes per micro-batch and process, the seed, the device."""

    batch_size: int
    grad_accum: int
    eval_batch_size: int
    rank: int
    world_size: int
    seed: int
    device: torch.device

    @property
    def per_rank(self) -> int:
        return self.batch_size * self.grad_accum

    def my_micro_batches(self, step_index: int, n: int) -> list[list[int]]:
        """This process's share of global batch ``step_index`` (0-based), cut into micro-batches."""
        indices = global_batch_indices(step_index, n, self.per_rank * self.world_size, self.seed)
        mine = indices[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]
        return [mine[j : j + self.batch_size] for j in range(0, len(mine), self.batch_size)]


class StaticBatches:
    """Batches of examples prepared once, with the losses' precomputed fields added."""

    has_eval_loss = True

    def __init__(self, data: Any, splits: DataSplits, layout: Layout, precision: Precision) -> None:
        self.data, self.splits, self.layout, self.precision = data, splits, layout, precision
        self.cache: dict[str, dict[str, torch.Tensor]] = {}

    def prepare(
        self,
        models: Models,
        losses: Sequence[tuple[str, LossComponent, LossCapabilities]],
        cache_dir: Path,
        resumed: bool,
        is_main: bool,
    ) -> None:
        """Run each declared ``precompute`` once over every example; reuse the cache on resume.

        Every process computes the whole cache (a one-time cost) so no gather is needed;
        the main process writes it. Then free the frozen models no step calls any more.
        """
        hooks = [(key, loss.precompute) for key, loss, caps in losses if caps.precompute]
        size = self.layout.eval_batch_size
        for split, examples in (("train", self.splits.train), ("eval", self.splits.eval)):
            fields: dict[str, torch.Tensor] = {}
            for key, fn in hooks:
                path = cache_dir / f"{key}-{split}.safetensors"
                if path.exists() and resumed:
                    found = load_file(str(path))
                else:
                    found = self._precompute(fn, models, examples, size)
                    if is_main and found:
                        path.parent.mkdir(parents=True, exist_ok=True)
                        save_file(found, str(path))
                clash = set(found) & set(fields)
                if clash:
                    raise AligntkError(f"losses precompute the same batch fields {sorted(clash)}; rename one")
                fields.update(found)
            if fields:
                self.cache[split] = fields
        live = {role for _, loss, caps in losses for role in (caps.live_roles or type(loss).roles)}
        for role in [r for r in models if r != "policy" and r not in live]:
            models.release(role)
            log.info("released the frozen %r model: its outputs are cached", role)
        if self.layout.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.no_grad()
    def _precompute(self, fn: Any, models: Models, examples: Sequence[Example], size: int) -> dict[str, torch.Tensor]:
        parts: list[dict[str, torch.Tensor]] = []
        for j in range(0, len(examples), size):
            batch = to_device(self.data.collate(list(examples[j : j + size])), self.layout.device)
            with self.precision.autocast():
                parts.append({k: v.float().cpu() for k, v in fn(models, batch).items()})
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}

    def micro_batches(self, step: int, models: Models) -> list[Batch]:
        """This process's micro-batches for optimizer step ``step`` (1-based), on the device."""
        return [
            self.batch("train", chunk)
            for chunk in self.layout.my_micro_batches(step - 1, len(self.splits.train))
        ]

    def batch(self, split: str, indices: Sequence[int]) -> Batch:
        """Collate examples ``indices`` of ``split``, add their cached fields, move to the device."""
        examples = self.splits.train if split == "train" else self.splits.eval
        batch = self.data.collate([examples[i] for i in indices])
        cached = self.cache.get(split)
        if cached:
            rows = torch.tensor(list(indices))
            batch.update({name: values[rows] for name, values in cached.items()})
        return to_device(batch, self.layout.device)

    def state_dict(self) -> dict[str, Any]:
        return {}  # the data order is a function of the step

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class OnlineBatches:
    """Micro-batches sampled from the current policy by the data component's ``rollout``.

    Each example handed to ``rollout`` carries ``sample_seed`` (``aligntk.sample_seed`` of
    the run's seed, the rollout block and the example's index): a generator that draws each
    completion from it samples the same completions on any number of processes and with any
    micro-batch size, and a resumed run samples what the uninterrupted one did.

    With ``iterations = k`` it samples once every ``k`` steps and trains ``k`` optimizer
    steps on the same rollouts: their old log-probs are from sampling time, so the clipped
    ratio is right on every step. Frozen models stay loaded: a rollout may call any of them.
    """

    has_eval_loss = False  # what the policy samples changes every step: no fixed evaluation loss

    def __init__(
        self, data: Any, splits: DataSplits, layout: Layout, precision: Precision, capabilities: DataCapabilities
    ) -> None:
        self.data, self.splits, self.layout, self.precision = data, splits, layout, precision
        self.iterations = capabilities.iterations
        self._block: tuple[int, list[Batch]] | None = None

    def prepare(self, models: Models, losses: Sequence[Any], cache_dir: Path, resumed: bool, is_main: bool) -> None:
        if any(caps.precompute for _, _, caps in losses):
            raise AligntkError("a loss precomputes per-example fields, which online data cannot cache: use static data")

    def micro_batches(self, step: int, models: Models) -> list[Batch]:
        block = (step - 1) // self.iterations
        if self._block is not None and self._block[0] == block:
            return self._block[1]
        train, seed = self.splits.train, self.layout.seed
        batches = [
            to_device(
                self.data.collate(
                    self._rollout(models, [{**train[i], "sample_seed": sample_seed(seed, block, i)} for i in chunk])
                ),
                self.layout.device,
            )
            for chunk in self.layout.my_micro_batches(block, len(train))
        ]
        self._block = (block, batches)
        return batches

    @torch.no_grad()
    def _rollout(self, models: Models, examples: list[Example]) -> list[Example]:
        policy = models.policy
        was_training = policy.training
        policy.eval()
        try:
            with self.precision.autocast():
                return list(self.data.rollout(models, examples))
        finally:
            policy.train(was_training)

    def batch(self, split: str, indices: Sequence[int]) -> Batch:
        examples = self.splits.train if split == "train" else self.splits.eval
        return to_device(self.data.collate([examples[i] for i in indices]), self.layout.device)

    def state_dict(self) -> dict[str, Any]:
        """The rollout block in use, so that a resume inside it trains on the same samples."""
        if self._block is None or self.iterations == 1:
            return {}
        block, batches = self._block
        cpu = [{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches]
        return {"block": block, "batches": cpu}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("batches") is not None:
            batches = [to_device(b, self.layout.device) for b in state["batches"]]
            self._block = (int(state["block"]), batches)


def make_batches(
    data: Any, capabilities: DataCapabilities, splits: DataSplits, layout: Layout, precision: Precision
) -> StaticBatches | OnlineBatches:
    """The batch source the data component's declaration calls for."""
    if capabilities.online:
        return OnlineBatches(data, splits, layout, precision, capabilities)
    return StaticBatches(data, splits, layout, precision)
