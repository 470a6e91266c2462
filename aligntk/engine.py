"""The training loop every method runs on.

The engine knows no method: a data component makes batches, loss components turn a
batch into a summed loss, an update step owns the optimizer. Everything else lives
here: devices, precision, accumulation, clipping, evaluation, checkpoints, the run
folder and the lifecycle hooks. It reads top to bottom: ``train`` sets up, then
``_Trainer.fit`` loops.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import shutil
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from . import sharding
from .batches import Layout, OnlineBatches, StaticBatches, global_batch_indices, make_batches  # noqa: F401
from .distributed import Dist, init_distributed, shutdown
from .errors import AligntkError, Interrupted, TrainingError
from .models import (
    Frozen,
    attach_heads,
    build_model,
    count_parameters,
    frozen_copy,
    heads_of,
    is_peft_model,
    load_tokenizer,
    save_merged,
    save_pretrained,
    unwrap,
)
from .plugins import Plugins
from .precision import Precision
from .recipe import ResolvedRecipe
from .rundir import check_run_dir, check_same_recipe, drop_metrics_after, record_written, start_run_dir
from .types import (
    Batch,
    DataContext,
    DataSplits,
    Example,
    LossCapabilities,
    LossComponent,
    LossContext,
    Models,
    RunInfo,
)

__all__ = ["RunResult", "global_batch_indices", "train"]

log = logging.getLogger("aligntk")

#: Optimizer steps the logged ``tokens_per_s`` is averaged over.
THROUGHPUT_WINDOW = 20

@dataclass
class RunResult:
    """What a finished run reports: its folder and the first and last evaluation."""

    run_dir: Path
    steps: int
    first_eval: dict[str, float] = field(default_factory=dict)
    last_eval: dict[str, float] = field(default_factory=dict)
    last_train: dict[str, float] = field(default_factory=dict)
    stopped: str | None = None
    is_main: bool = True
    wall_time: float = 0.0  # seconds this process spent in the run: loading, training, evaluation, saving


def _count_tokens(batch: Batch) -> torch.Tensor:
    """Non-pad tokens: every ``*attention_mask`` field (preference batches have two)."""
    masks = [v for k, v in batch.items() if k.endswith("attention_mask") and isinstance(v, torch.Tensor)]
    if masks:
        return sum(m.sum() for m in masks)
    ids = batch.get("input_ids")
    return torch.tensor(ids.numel() if ids is not None else 0)


def train(
    resolved: ResolvedRecipe,
    plugins: Plugins,
    *,
    resume: bool = False,
    overwrite: bool = False,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    reward_fns: Sequence[tuple[str, Callable[..., Any]]] = (),
) -> RunResult:
    """Run a validated recipe to the end; return where it wrote and what it measured.

    ``model`` and ``tokenizer`` (in-memory, from ``aligntk.train``) replace loading
    ``model:``; ``reward_fns`` are ``(name, fn)`` pairs scored after the recipe's rewards,
    each with weight 1.
    """
    started = time.perf_counter()  # wall time counts model and data loading too
    recipe, spec = resolved.recipe, resolved.train
    plugins = plugins.without(resolved.disabled_plugins)  # `enabled: false` in the recipe's plugins section
    fsdp = spec.distributed == "fsdp"
    d = init_distributed(spec.device, needs_group=fsdp)
    run_dir = Path(recipe.output_dir).expanduser()
    try:
        candidates = check_run_dir(run_dir, resume, overwrite)
        base_dir = resolved.source.resolve().parent if resolved.source else Path.cwd()

        torch.manual_seed(recipe.seed)  # same initial weights on every process
        tokenizer, policy, models = _load_models(resolved, base_dir, d.device, model, tokenizer)
        data = resolved.data.build()
        rewards = [(c.weight, c.build()) for c in resolved.rewards] + [(1.0, fn) for _, fn in reward_fns]
        names = [c.name for c in resolved.rewards] + [name for name, _ in reward_fns]
        ctx = DataContext(tokenizer=tokenizer, seed=recipe.seed, run_dir=run_dir, rewards=rewards, reward_names=names)
        splits = data.load(ctx)
        _check_setup(resolved, splits, d)

        update = resolved.update.build()
        losses = [c.build() for c in resolved.losses]
        loss_ctx = LossContext(tokenizer=tokenizer, seed=recipe.seed, splits=splits, device=d.device)
        for spec_, loss in zip(resolved.losses, losses):
            if spec_.capabilities.setup:  # what a loss fits on the data (BCO's UDM classifier)
                loss.setup(loss_ctx)
        policy = update.prepare(policy)
        if recipe.model.save_merged and not _mergeable(policy):
            raise AligntkError(
                f"model.save_merged: update {resolved.update.name!r} trains no LoRA adapter to merge "
                "(the run's model/ is already a whole model)"
            )
        attach_heads(policy, _declared_heads(resolved, losses, policy))
        policy = policy.to(d.device)
        if spec.gradient_checkpointing:
            _enable_checkpointing(unwrap(policy))
        template = None
        if fsdp:  # shard before the optimizer is built: it must hold the sharded parameters
            _check_fsdp(resolved, update, policy)
            template = sharding.skeleton(policy)
            policy = sharding.shard(policy, spec.fsdp, d.device)
        optimizer, scheduler = update.configure(policy, spec.max_steps)
        precision = Precision(spec.precision, d.device)
        trainer_state: dict[str, Any] = {"step": 0}
        resume_from = None
        if candidates:
            check_same_recipe(run_dir, resolved)
            resume_from, trainer_state = ckpt.load_latest(
                candidates, policy, optimizer, scheduler, precision.scaler, only_trainable=ckpt.trains_a_part(policy),
                sharded=fsdp,
            )
            log.info("resuming from %s (step %d)", resume_from, trainer_state["step"])
        start_step = int(trainer_state["step"])
        trainable, total = count_parameters(policy)
        if trainable == 0:
            raise AligntkError(f"update {resolved.update.name!r}: no parameter is trainable")
        if d.enabled and not fsdp:
            policy = torch.nn.parallel.DistributedDataParallel(
                policy, device_ids=[d.device.index] if d.device.type == "cuda" else None
            )
        if spec.compile:
            policy = torch.compile(policy)
        models["policy"] = policy
        if d.is_main:
            start_run_dir(run_dir, resolved, plugins, splits, fresh=resume_from is None)
            if resume_from is not None:
                drop_metrics_after(run_dir / "metrics.jsonl", start_step)
        d.barrier()

        info = RunInfo(
            run_dir=run_dir,
            recipe=resolved.dump(),
            max_steps=spec.max_steps,
            start_step=start_step,
            world_size=d.world_size,
            device=str(d.device),
            trainable_parameters=trainable,
            total_parameters=total,
            plugin_options=dict(resolved.plugin_options),
        )
        trainer = _Trainer(
            resolved=resolved,
            plugins=plugins,
            d=d,
            info=info,
            tokenizer=tokenizer,
            models=Models(models, heads=heads_of(policy)),
            batches=make_batches(
                data,
                resolved.data.capabilities,
                splits,
                Layout(
                    batch_size=spec.batch_size,
                    grad_accum=spec.grad_accum,
                    eval_batch_size=spec.eval_batch_size or spec.batch_size,
                    rank=d.rank,
                    world_size=d.world_size,
                    seed=recipe.seed,
                    device=d.device,
                ),
                precision,
            ),
            splits=splits,
            losses=losses,
            weights=[c.weight for c in resolved.losses],
            evaluators=[(c.name, c.build()) for c in resolved.evaluators],
            update=update,
            optimizer=optimizer,
            scheduler=scheduler,
            precision=precision,
        )
        trainer.started = started
        trainer.template = template
        trainer.tokens_seen = int(trainer_state.get("tokens_seen", 0))
        trainer.skips = _Skips(
            int(trainer_state.get("skipped_steps", 0)), int(trainer_state.get("skipped_in_a_row", 0))
        )
        trainer.batches.load_state_dict(trainer_state.get("data") or {})
        result = trainer.fit()
        d.barrier()  # before the process group goes: see distributed.shutdown
        if d.enabled:  # freed at exit, never here: see distributed.shutdown
            _FINISHED.append(trainer)
        return result
    finally:
        shutdown(d)


#: Trainers of finished multi-process runs, kept until the process exits (``aligntk run``
#: leaves with ``os._exit``): freeing one frees its DDP/FSDP wrappers and with them gloo's
#: process group, whose destructor can deadlock with gloo's worker threads over the GIL.
_FINISHED: list[_Trainer] = []


def _load_models(
    resolved: ResolvedRecipe,
    base_dir: Path,
    device: torch.device,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
) -> tuple[Any, torch.nn.Module, dict[str, torch.nn.Module]]:
    """The tokenizer, the policy, and a frozen model for every other role the losses declare.

    A ``model.path`` that is an adapter folder loads as base + adapter (``model.adapter``), so
    a role that defaults to the policy as it starts (DPO's and GRPO's ``reference``) is that
    model, adapter included or merged: never the bare base.

    An in-memory ``model`` or ``tokenizer`` (``aligntk.train``) is used as given instead of
    loading ``recipe.model``.
    """
    recipe = resolved.recipe
    if tokenizer is None:
        tokenizer = load_tokenizer(recipe.model, base_dir)
    policy = model if model is not None else build_model(recipe.model, tokenizer, base_dir)
    frozen: dict[str, torch.nn.Module] = {}
    for role in resolved.roles()[1:]:
        if role in recipe.models:
            other = build_model(recipe.models[role], tokenizer, base_dir, key=f"models.{role}")
            frozen[role] = Frozen(other).to(device)
        else:  # the reference defaults to the policy as it starts
            frozen[role] = frozen_copy(policy).to(device)
    return tokenizer, policy, frozen


def _declared_heads(
    resolved: ResolvedRecipe, losses: list[LossComponent], policy: torch.nn.Module
) -> dict[str, torch.nn.Module]:
    """The trainable heads the losses declare (``LossCapabilities.heads``), by name."""
    heads: dict[str, torch.nn.Module] = {}
    for spec, loss in zip(resolved.losses, losses):
        for name, head in (loss.heads(unwrap(policy)) if spec.capabilities.heads else {}).items():
            if name in heads:
                raise AligntkError(f"two losses declare a trainable head named {name!r}")
            heads[name] = head
    return heads


def _check_setup(resolved: ResolvedRecipe, splits: DataSplits, d: Dist) -> None:
    """What only the loaded data and the process count can tell, checked before step one."""
    spec = resolved.train
    if not splits.train:
        raise AligntkError(f"data: the {resolved.data.name!r} data gave no training examples")
    for loss in resolved.losses:
        if loss.capabilities.whole_batch and (spec.grad_accum > 1 or d.world_size > 1):
            raise AligntkError(
                f"loss {loss.name!r} computes statistics over the whole batch, so it needs one micro-batch per "
                f"step: set train.grad_accum: 1 and run one process (raise train.batch_size instead)"
            )
    if resolved.evaluators and not splits.eval:
        raise AligntkError(
            "evaluators: there are no evaluation examples to run them on; set data.eval_path or data.eval_fraction"
        )


def _mergeable(model: torch.nn.Module) -> bool:
    """A peft model whose adapters are all LoRA: what ``merge_and_unload`` can fold into the weights."""
    if not is_peft_model(model):
        return False
    return all(str(c.peft_type).endswith("LORA") for c in unwrap(model).peft_config.values())


def _check_fsdp(resolved: ResolvedRecipe, update: Any, policy: torch.nn.Module) -> None:
    """What ``train.distributed: fsdp`` does not support yet, as one line before anything is sharded."""
    if resolved.train.precision == "fp16":
        raise AligntkError(
            "train.distributed: fsdp does not support precision fp16 (its gradient scaler is not sharded); "
            "use bf16, or fsdp.param_dtype: bfloat16"
        )
    if update.penalty(unwrap(policy)) is not None:
        raise AligntkError(
            f"update {resolved.update.name!r} adds a penalty on the weights, which train.distributed: fsdp "
            "does not support yet (it holds the unsharded parameters); use distributed: ddp"
        )


def _enable_checkpointing(model: torch.nn.Module) -> None:
    """Recompute activations in the backward pass instead of keeping them."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@dataclass
class _Skips:
    """Optimizer steps whose update was dropped (non-finite loss or gradients): in all, and in a row."""

    total: int = 0
    in_a_row: int = 0


class _StopSignals:
    """SIGTERM (what SLURM and Kubernetes send before they kill) and SIGINT ask for a clean stop.

    The first one only sets ``received``: the loop finishes the optimizer step it is in,
    writes a checkpoint and exits. A second one gets the previous handler (Ctrl-C twice
    stops at once). Handlers can only be set from the main thread; elsewhere this does nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        log.warning(
            "received %s: stopping after this optimizer step with a checkpoint (send it again to stop at once)",
            signal.Signals(signum).name,
        )

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


class _MetricSums:
    """Loss metrics summed over micro-batches; reduced over processes with the loss sums.

    A metric is a sum over its loss's units (divided by that loss's global count) or a
    ``(sum, count)`` pair with units of its own (divided by its own global count).
    """

    def __init__(self, prefixes: list[str]):
        self.prefixes = prefixes
        self.num: dict[str, torch.Tensor] = {}
        self.den: dict[str, torch.Tensor] = {}
        self.loss_of: dict[str, int] = {}

    def add(self, i: int, metrics: dict[str, Any]) -> None:
        for name, value in metrics.items():
            key = name if len(self.prefixes) == 1 else f"{self.prefixes[i]}/{name}"
            num, den = value if isinstance(value, tuple) else (value, None)
            self.num[key] = self.num.get(key, 0) + num.detach().float()
            if den is None:
                self.loss_of[key] = i
            else:
                self.den[key] = self.den.get(key, 0) + den.detach().float()

    def packed(self, device: torch.device) -> torch.Tensor:
        parts = [self.num[k] for k in self.num] + [self.den[k] for k in self.den]
        return torch.stack(parts).reshape(-1) if parts else torch.zeros(0, device=device)

    def results(self, values: list[float], loss_counts: list[float]) -> dict[str, float]:
        """``values``: the reduced ``packed()``; ``loss_counts``: each loss's global count."""
        nums = dict(zip(self.num, values))
        dens = dict(zip(self.den, values[len(self.num) :]))
        return {k: v / max(dens[k] if k in dens else loss_counts[self.loss_of[k]], 1e-12) for k, v in nums.items()}


@dataclass
class _Trainer:
    resolved: ResolvedRecipe
    plugins: Plugins
    d: Dist
    info: RunInfo
    tokenizer: Any
    models: Models
    batches: StaticBatches | OnlineBatches
    splits: DataSplits
    losses: list[LossComponent]
    weights: list[float]
    evaluators: list[tuple[str, Any]]
    update: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    precision: Precision

    def __post_init__(self) -> None:
        spec = self.resolved.train
        self.spec = spec
        self.policy = self.models.policy
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        self.capabilities: list[LossCapabilities] = [c.capabilities for c in self.resolved.losses]
        self.metrics_file = self.info.run_dir / "metrics.jsonl"
        self.tokens_seen = 0
        self.skips = _Skips()
        self.signals = _StopSignals()
        self._listed: set[str] = set()  # run-folder entries already in the run manifest
        self.started = time.perf_counter()
        self._recent: collections.deque[tuple[float, float]] = collections.deque(maxlen=THROUGHPUT_WINDOW)
        names = [c.name for c in self.resolved.losses]
        # Metric prefixes: the loss name, with its index when a recipe uses a loss twice.
        self.loss_keys = [n if names.count(n) == 1 else f"{n}.{i}" for i, n in enumerate(names)]
        # FSDP2: the policy is sharded; ``template`` (set by ``train``) is its weight-less skeleton,
        # filled with the gathered weights wherever one process needs the plain model.
        self.fsdp = sharding.is_sharded(unwrap(self.policy))
        self.template: torch.nn.Module | None = None

    # -- the loop ---------------------------------------------------------------------

    def fit(self) -> RunResult:
        info, spec = self.info, self.spec
        result = RunResult(run_dir=info.run_dir, steps=info.start_step, is_main=self.d.is_main)
        error: BaseException | None = None
        evaluated_at = -1
        try:
            self.signals.__enter__()
            self.batches.prepare(
                self.models,
                list(zip(self.loss_keys, self.losses, self.capabilities)),
                info.run_dir / "cache",
                resumed=info.start_step > 0,
                is_main=self.d.is_main,
            )
            if self.d.is_main:
                self.plugins.on_run_start(info)
            if info.start_step == 0:
                result.first_eval, evaluated_at = self._evaluate(0), 0
            for step in range(info.start_step + 1, spec.max_steps + 1):
                metrics = self.train_step(step)
                preempted = bool(metrics.pop("stop_signal"))  # the same on every process
                self.tokens_seen += int(metrics["tokens"])
                metrics["tokens_seen"] = self.tokens_seen
                result.steps, result.last_train = step, metrics
                stop, hook_error = None, None
                if self.d.is_main and (step % spec.log_every == 0 or step == spec.max_steps):
                    self._write({"split": "train", "step": step, **metrics})
                    try:
                        stop = self.plugins.on_step_end(info, step, metrics)
                    except BaseException as exc:  # tell the other processes before raising
                        hook_error, stop = exc, f"a lifecycle hook raised {type(exc).__name__}"
                if self.d.broadcast_flag(stop is not None):
                    result.stopped = stop or "stopped by a plugin on the main process"
                if hook_error is not None:
                    raise hook_error
                if spec.eval_every and step % spec.eval_every == 0 and step != spec.max_steps and not preempted:
                    result.last_eval, evaluated_at = self._evaluate(step), step
                if (spec.save_every and step % spec.save_every == 0) or preempted:
                    path = self.save_checkpoint(step)
                if preempted:
                    name = signal.Signals(self.signals.received or signal.SIGTERM).name
                    raise Interrupted(
                        f"stopped by {name} after step {step} of {spec.max_steps}; checkpoint {path}: "
                        "continue with --resume"
                    )
                if result.stopped:
                    log.warning("stopping after step %d: %s", step, result.stopped)
                    break
            if evaluated_at != result.steps:
                result.last_eval = self._evaluate(result.steps)
            if self.fsdp:  # every process gathers; the main one writes
                state = sharding.full_state_dict(unwrap(self.policy), rank0_only=True)
                if self.d.is_main:
                    self.save_model(self._replica(state, torch.device("cpu")))
                self.d.barrier()
            elif self.d.is_main:
                self.save_model()
            result.wall_time = time.perf_counter() - self.started
        except BaseException as exc:
            error = exc
            raise
        finally:
            self.signals.__exit__()
            if self.d.is_main:
                try:
                    self.plugins.on_run_end(info, {**result.last_train, **result.last_eval}, error)
                finally:
                    record_written(info.run_dir)
        return result

    def train_step(self, step: int) -> dict[str, float]:
        started = time.perf_counter()
        for loss, caps in zip(self.losses, self.capabilities):
            if caps.scheduled:
                loss.start_step(step, self.spec.max_steps)
        if self.fsdp and isinstance(self.batches, OnlineBatches):
            with self._plain_policy():  # rollouts sample from the whole policy, with no collectives
                batches = self.batches.micro_batches(step, self.models)
        else:
            batches = self.batches.micro_batches(step, self.models)
        # Each loss is divided by its unit count over the whole global batch (every
        # micro-batch on every process), known before any backward: accumulation and
        # DDP then give exactly the gradient of one large batch.
        counts = torch.stack(
            [torch.stack([loss.count(b) for b in batches]).sum().float() for loss in self.losses]
        ).to(self.d.device)
        self.d.all_reduce(counts)
        denominators = counts.clamp(min=1.0)
        # DDP and FSDP2 average gradients over processes; scale by world size so the result is a sum.
        scale = float(self.d.world_size)

        self.policy.train()
        n_losses = len(self.losses)
        sums = torch.zeros(n_losses, device=self.d.device)
        metric_sums = _MetricSums(self.loss_keys)
        tokens = torch.zeros((), device=self.d.device)
        penalty = self.update.penalty(unwrap(self.policy))
        for j, batch in enumerate(batches):
            last = j == len(batches) - 1
            if self.fsdp:  # reduce-scatter once, after the last micro-batch; accumulate unsharded before
                sharding.set_gradient_sync(unwrap(self.policy), last)
                sync: Any = contextlib.nullcontext()
            else:
                sync = contextlib.nullcontext() if last or not self.d.enabled else self.policy.no_sync()
            with sync:
                with self.precision.autocast():
                    total = torch.zeros((), device=self.d.device)
                    for i, loss in enumerate(self.losses):
                        out = loss(self.models, batch)
                        total = total + self.weights[i] * out.sum / denominators[i]
                        sums[i] += out.sum.detach().float()
                        metric_sums.add(i, out.metrics)
                    if penalty is not None and j == 0:
                        total = total + penalty / scale
                    total = total * scale
                self._backward(total)
            tokens += _count_tokens(batch)

        grad_norm = self._unscale_and_clip()
        # One all-reduce and one host sync per optimizer step: for logging, the non-finite
        # guard, and a stop signal that any process received (so every process stops here).
        signalled = torch.tensor([float(self.signals.received != 0)], device=self.d.device)
        packed = torch.cat([sums, metric_sums.packed(self.d.device), tokens[None], signalled])
        self.d.all_reduce(packed)
        values = torch.cat([packed, grad_norm.detach().float()[None]]).tolist()
        *values, n_tokens, stop_signal, grad_norm_value = values
        loss_counts = denominators.tolist()
        per_loss = [values[i] / loss_counts[i] for i in range(n_losses)]
        loss_value = sum(w * v for w, v in zip(self.weights, per_loss))
        if penalty is not None:
            loss_value += float(penalty.detach())
        lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
        skipped = self._apply_update(step, loss_value, grad_norm_value)
        elapsed = time.perf_counter() - started
        metrics: dict[str, float] = {
            "loss": loss_value,
            "lr": lr,
            "grad_norm": grad_norm_value,
            "tokens": n_tokens,
            "tokens_per_s": self._throughput(n_tokens, elapsed),
            "step_time": elapsed,
            "wall_time": time.perf_counter() - self.started,
        }
        if self.skips.total:
            metrics.update({"skipped": float(skipped), "skipped_steps": float(self.skips.total)})
        if n_losses > 1:
            metrics.update({f"{k}/loss": v for k, v in zip(self.loss_keys, per_loss)})
        metrics.update(metric_sums.results(values[n_losses:], loss_counts))
        metrics["stop_signal"] = stop_signal
        return metrics

    def _throughput(self, tokens: float, seconds: float) -> float:
        """Tokens per second over the last ``THROUGHPUT_WINDOW`` steps: one step's value swings
        with the batch's lengths and the machine's other load; a window reads steadily."""
        self._recent.append((tokens, seconds))
        total = sum(t for _, t in self._recent)
        return sum(n for n, _ in self._recent) / total if total > 0 else 0.0

    def _apply_update(self, step: int, loss_value: float, grad_norm: float) -> bool:
        """Step the optimizer only on a finite loss and finite gradients; return whether the update was dropped.

        Under fp16 an overflow in the gradients is the gradient scaler's business: it skips the
        step and lowers its scale, which is expected now and then, so it is counted, not an
        error, until ``train.max_skipped_steps`` in a row. A non-finite loss, or non-finite
        gradients without a scaler, follows ``train.on_nonfinite``: ``stop`` (the default)
        raises before anything is applied; ``skip`` drops this update and goes on.
        """
        scaler_overflow = self.precision.scaler is not None and math.isfinite(loss_value)
        if math.isfinite(loss_value) and math.isfinite(grad_norm):
            self._optimizer_step()
            self.skips.in_a_row = 0
            return False
        self.optimizer.zero_grad(set_to_none=True)
        if self.precision.scaler is not None:
            self.precision.scaler.update()  # lowers the scale; unscale_ was called for this step
        what = f"the gradient norm is {grad_norm}" if math.isfinite(loss_value) else f"the loss is {loss_value}"
        if self.spec.on_nonfinite == "stop" and not scaler_overflow:
            raise TrainingError(
                f"step {step}: {what} (not finite); stopped before applying this update, {self._last_good()}. "
                "Lower update.learning_rate, use precision bf16 rather than fp16, check the data, or set "
                "train.on_nonfinite: skip"
            )
        self.skips.total += 1
        self.skips.in_a_row += 1
        log.warning("step %d: %s (not finite): this update was dropped (%d in a row)", step, what, self.skips.in_a_row)
        if self.skips.in_a_row >= self.spec.max_skipped_steps:
            raise TrainingError(
                f"step {step}: {self.skips.in_a_row} updates in a row were dropped ({what}); stopped, "
                f"{self._last_good()}. Lower update.learning_rate or check the data (train.max_skipped_steps sets the limit)"
            )
        return True

    def _last_good(self) -> str:
        """The newest checkpoint that verifies, for a message; only read when stopping (it hashes files)."""
        last = ckpt.latest_checkpoint(self.info.run_dir)
        return f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"

    def _backward(self, total: torch.Tensor) -> None:
        scaler = self.precision.scaler
        (scaler.scale(total) if scaler is not None else total).backward()

    def _unscale_and_clip(self) -> torch.Tensor:
        """The global gradient norm before clipping (gradients are unscaled first under fp16)."""
        if self.precision.scaler is not None:
            self.precision.scaler.unscale_(self.optimizer)
        max_norm = self.update.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm if max_norm else float("inf"))
        return sharding.full_norm(norm)  # over DTensor shards: the norm of the whole gradient

    def _optimizer_step(self) -> None:
        scaler = self.precision.scaler
        if scaler is not None:
            scaler.step(self.optimizer)  # gradients are finite here, so the scaler steps
            scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    # -- evaluation, checkpoints, metrics ---------------------------------------------

    #: Each evaluation's generations that evaluators show (``EvaluatorCapabilities.samples``).
    SAMPLES_FILE = "samples.jsonl"

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """Evaluation loss on this process's share of the eval split, then the evaluators."""
        examples: Sequence[Example] = self.splits.eval
        if not examples and not self.evaluators:
            return {}
        metrics: dict[str, float] = {}
        was_training = self.policy.training
        self.policy.eval()
        if examples and self.batches.has_eval_loss:
            metrics.update(self._eval_loss(examples))
        if self.d.is_main:
            model = unwrap(self.policy)
            names = [name for name, _ in self.evaluators]
            samples: list[dict[str, Any]] = []
            for i, ((name, evaluator), spec) in enumerate(zip(self.evaluators, self.resolved.evaluators)):
                with self.precision.autocast():
                    metrics.update(evaluator(model, self.tokenizer, examples))
                if spec.capabilities is not None and spec.capabilities.samples:
                    key = name if names.count(name) == 1 else f"{name}.{i}"
                    shown = evaluator.samples()
                    samples += [{"step": step, "evaluator": key, "index": j, **vars(s)} for j, s in enumerate(shown)]
            self._write_samples(step, samples)  # before the eval record, so the run manifest lists it with it
            self._write({"split": "eval", "step": step, **metrics})
            self.plugins.on_eval_end(self.info, step, metrics)
        self.d.barrier()
        self.policy.train(was_training)
        return metrics

    def _write_samples(self, step: int, records: list[dict[str, Any]]) -> None:
        """Append this evaluation's samples to ``samples.jsonl``, dropping any of this step or later first.

        Those are from before a resume: the resumed run evaluates those steps again.
        """
        path = self.info.run_dir / self.SAMPLES_FILE
        if path.exists():
            drop_metrics_after(path, step - 1)
        if records:
            with path.open("a", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)

    def _eval_loss(self, examples: Sequence[Example]) -> dict[str, float]:
        size = self.spec.eval_batch_size or self.spec.batch_size
        mine = list(range(self.d.rank, len(examples), self.d.world_size))
        n = len(self.losses)
        totals = torch.zeros(2 * n, device=self.d.device)
        metric_sums = _MetricSums(self.loss_keys)
        for j in range(0, len(mine), size):
            batch = self.batches.batch("eval", mine[j : j + size])
            with self.precision.autocast():
                for i, loss in enumerate(self.losses):
                    out = loss(self.models, batch)
                    totals[2 * i] += out.sum.float()
                    totals[2 * i + 1] += out.count.float()
                    metric_sums.add(i, out.metrics)
        packed = torch.cat([totals, metric_sums.packed(self.d.device)])
        values = self.d.all_reduce(packed).tolist()
        counts = [max(values[2 * i + 1], 1.0) for i in range(n)]
        per_loss = [values[2 * i] / counts[i] for i in range(n)]
        result = {"eval_loss": sum(w * v for w, v in zip(self.weights, per_loss))}
        if n > 1:
            result.update({f"eval_{k}/loss": v for k, v in zip(self.loss_keys, per_loss)})
        result.update({f"eval_{k}": v for k, v in metric_sums.results(values[2 * n :], counts).items()})
        return result

    def _evaluate(self, step: int) -> dict[str, float]:
        """``evaluate``; under FSDP2 on a gathered replica of the policy (evaluators run on one process)."""
        if not self.fsdp or (not self.splits.eval and not self.evaluators):
            return self.evaluate(step)
        with self._plain_policy():
            return self.evaluate(step)

    def _replica(self, state: dict[str, torch.Tensor], device: torch.device) -> torch.nn.Module:
        assert self.template is not None
        return sharding.replica(self.template, state, device)

    @contextlib.contextmanager
    def _plain_policy(self) -> Any:
        """The policy as a plain module on every process for the block (gathered whole: a collective)."""
        sharded, models = self.policy, self.models
        plain = self._replica(sharding.full_state_dict(unwrap(sharded), rank0_only=False), self.d.device)
        plain.train(sharded.training)
        self.policy = plain
        self.models = Models({**dict(models), "policy": plain}, heads=heads_of(plain))
        try:
            yield plain
        finally:
            self.policy, self.models = sharded, models

    def save_checkpoint(self, step: int) -> Path:
        path = ckpt.checkpoint_dir(self.info.run_dir) / f"step-{step:08d}"
        if self.fsdp:
            path = ckpt.save_sharded_checkpoint(
                self.info.run_dir,
                step,
                unwrap(self.policy),
                self.optimizer,
                self.scheduler,
                keep=self.spec.keep_checkpoints,
                trainer_state=self._trainer_state(),
                data_state=self.batches.state_dict(),
                only_trainable=ckpt.trains_a_part(unwrap(self.policy)),
            )
            if self.d.is_main:
                self.plugins.on_checkpoint_saved(self.info, step, path)
            self.d.barrier()
            return path
        if self.d.is_main:
            path = ckpt.save_checkpoint(
                self.info.run_dir,
                step,
                unwrap(self.policy),
                self.optimizer,
                self.scheduler,
                self.precision.scaler,
                keep=self.spec.keep_checkpoints,
                trainer_state={
                    "tokens_seen": self.tokens_seen,
                    "skipped_steps": self.skips.total,
                    "skipped_in_a_row": self.skips.in_a_row,
                },
                data_state=self.batches.state_dict(),
                only_trainable=ckpt.trains_a_part(unwrap(self.policy)),
            )
            self.plugins.on_checkpoint_saved(self.info, step, path)
        self.d.barrier()
        return path

    def _trainer_state(self) -> dict[str, Any]:
        return {"tokens_seen": self.tokens_seen, "skipped_steps": self.skips.total, "skipped_in_a_row": self.skips.in_a_row}

    def save_model(self, model: torch.nn.Module | None = None) -> None:
        """The final model in Hugging Face format, written whole or not at all, never with non-finite weights.

        ``model``: what to write instead of the policy (under FSDP2, the gathered replica).
        """
        model = model if model is not None else self.policy
        final = self.info.run_dir / "model"
        tmp = self.info.run_dir / ".tmp-model"
        ckpt.require_finite(unwrap(model), f"the final model to {final}")
        record_written(self.info.run_dir, also=[tmp.name])  # a crash mid-write leaves only the run's own files
        shutil.rmtree(tmp, ignore_errors=True)
        save_pretrained(model, self.tokenizer, tmp)
        if final.is_symlink() or final.is_file():
            final.unlink()
        elif final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if self.resolved.recipe.model.save_merged:  # base + LoRA adapter as one plain model
            merged, tmp = self.info.run_dir / "model-merged", self.info.run_dir / ".tmp-model-merged"
            record_written(self.info.run_dir, also=[tmp.name])
            shutil.rmtree(tmp, ignore_errors=True)
            save_merged(self.policy, self.tokenizer, tmp)
            shutil.rmtree(merged, ignore_errors=True)
            tmp.rename(merged)

    def _write(self, record: dict[str, Any]) -> None:
        with self.metrics_file.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        # Files that lifecycle plugins write join the run manifest (only a listing when nothing is new).
        names = {p.name for p in self.info.run_dir.iterdir()}
        if not names <= self._listed:
            record_written(self.info.run_dir)
            self._listed = names
