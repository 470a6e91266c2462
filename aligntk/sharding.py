"""FSDP2 for ``train.distributed: fsdp``: shard the policy, gather it back, checkpoint its shards.

The policy's decoder layers (the classes transformers names in ``_no_split_modules``) are
each wrapped with ``fully_shard``, then the whole model: every process holds
``1 / world_size`` of each weight, gradient and optimizer state, and a layer's weights
are all-gathered only while it runs. Frozen models (reference, teacher) stay whole on
every process; where their outputs are cached, the engine releases them after precompute.

Code that needs the plain model (evaluators, generation for rollouts, the final save)
gets a *replica*: an ordinary module built from a weight-less skeleton and the full
state dict, so it runs on one process without collectives.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .errors import AligntkError
from .recipe import FsdpSpec

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: Sub-folder of a checkpoint holding the ``torch.distributed.checkpoint`` shards.
SHARDED = "sharded"


def _fsdp() -> Any:
    from torch.distributed import fsdp

    return fsdp


def layer_classes(model: torch.nn.Module) -> set[str]:
    """Class names of the blocks to shard one by one: every ``_no_split_modules`` in the model."""
    names: set[str] = set()
    for m in model.modules():
        names |= set(getattr(m, "_no_split_modules", None) or ())
    return names


def shard(model: torch.nn.Module, spec: FsdpSpec, device: torch.device) -> torch.nn.Module:
    """``fully_shard`` each decoder layer, then the root, in place; returns ``model``.

    The root keeps FSDP2's own default (not resharded after forward), so trainable heads
    and the chunked log-prob path may call the output layer right after the model's forward.
    """
    fsdp = _fsdp()
    names = layer_classes(model)
    layers = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    if not layers:
        raise AligntkError(
            f"train.distributed: fsdp: found no decoder layer to shard in {type(model).__name__} "
            "(transformers' _no_split_modules names none)"
        )
    param_dtype = _DTYPES[spec.param_dtype] if spec.param_dtype else None
    reduce_dtype = _DTYPES[spec.reduce_dtype] if spec.reduce_dtype else param_dtype
    kwargs: dict[str, Any] = {"mp_policy": fsdp.MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)}
    if spec.cpu_offload:
        kwargs["offload_policy"] = fsdp.CPUOffloadPolicy()
    for layer in layers:
        fsdp.fully_shard(layer, reshard_after_forward=spec.reshard_after_forward, **kwargs)
    fsdp.fully_shard(model, **kwargs)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, _fsdp().FSDPModule)


def set_gradient_sync(model: torch.nn.Module, sync: bool) -> None:
    """Reduce-scatter gradients in this backward (``True``) or keep accumulating them unsharded."""
    model.set_requires_gradient_sync(sync)  # type: ignore[operator]


def full_norm(norm: torch.Tensor) -> torch.Tensor:
    """``clip_grad_norm_``'s result over DTensor gradients as a plain tensor: the norm of the full gradient."""
    from torch.distributed.tensor import DTensor

    return norm.full_tensor() if isinstance(norm, DTensor) else norm


# -- the plain model back -------------------------------------------------------------


def skeleton(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with its parameters on the meta device (no memory) and its buffers real.

    Made before sharding; ``replica`` fills it with gathered weights.
    """
    memo: dict[int, Any] = {
        id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for p in model.parameters()
    }
    return copy.deepcopy(model, memo)


def full_state_dict(model: torch.nn.Module, rank0_only: bool) -> dict[str, torch.Tensor]:
    """Every weight of a sharded ``model`` whole; a collective: every process calls it.

    ``rank0_only``: gathered to CPU memory of the main process only (the others get ``{}``).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=rank0_only)
    return get_model_state_dict(model, options=options)


def replica(template: torch.nn.Module, state: dict[str, torch.Tensor], device: torch.device) -> torch.nn.Module:
    """A plain module: a copy of ``template`` (a ``skeleton``) holding the weights ``state``."""
    model = copy.deepcopy(template)
    weights = {k: _own_storage(v.to(device)) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta or unexpected:
        raise AligntkError(f"gathering the sharded model: missing {still_meta[:3]}, unexpected {unexpected[:3]}")
    return model


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """``t``, copied when it is a view into a larger buffer (gathered weights can be slices of
    one all-gather output): safetensors refuses to save a tensor that does not cover its storage."""
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        return t.clone()
    return t


def nonfinite_shards(model: torch.nn.Module) -> list[str]:
    """Names of the parameters whose local shard holds a NaN or an infinity, agreed over processes."""
    from torch.distributed.tensor import DTensor

    names, flags = [], []
    for n, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point():
            local = t.to_local() if isinstance(t, DTensor) else t
            names.append(n)
            flags.append((~torch.isfinite(local)).any().float() if local.numel() else torch.zeros((), device=local.device))
    if not flags:
        return []
    bad = torch.stack(flags)
    if dist.is_initialized():
        dist.all_reduce(bad)
    return [n for n, b in zip(names, bad.tolist()) if b > 0]


# -- sharded checkpoints --------------------------------------------------------------


def _options(only_trainable: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=only_trainable)


def save_shards(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, only_trainable: bool) -> None:
    """Model and optimizer shards into ``folder`` through ``torch.distributed.checkpoint``; a collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=_options(only_trainable))
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(folder))


def load_shards(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, only_trainable: bool) -> None:
    """Read ``save_shards``'s ``folder`` into the sharded model and optimizer (DCP reshards to this
    run's process count); a collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    options = _options(only_trainable)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=options
    )
