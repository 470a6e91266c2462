"""Parameter groups, the optimizer and the learning-rate schedule, for every update step."""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any

import torch
from transformers import get_scheduler

from .options import UpdateOptions

_SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def name_matches(name: str, pattern: str) -> bool:
    """A glob matched anywhere in a dotted parameter name (``embed_tokens``, ``layers.0.*``)."""
    return fnmatchcase(name, pattern) or fnmatchcase(name, f"*{pattern}*")


def param_groups(model: torch.nn.Module, options: UpdateOptions) -> list[dict[str, Any]]:
    """Trainable parameters grouped by (learning rate, weight decay).

    Matrices get ``options.weight_decay``; 1-D tensors (biases, norm weights) and
    scalars get none, since decaying them towards zero only hurts. A parameter takes
    the rate of the first ``options.learning_rates`` pattern that matches its name.
    """
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    names: dict[tuple[float, float], list[str]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr = next((v for p, v in options.learning_rates.items() if name_matches(name, p)), options.learning_rate)
        decay = options.weight_decay if param.ndim >= 2 else 0.0
        groups.setdefault((lr, decay), []).append(param)
        names.setdefault((lr, decay), []).append(name)
    return [
        {"params": params, "lr": lr, "weight_decay": decay, "names": names[(lr, decay)]}
        for (lr, decay), params in groups.items()
    ]


def _fused(params: list[torch.nn.Parameter], asked: bool | None) -> bool | None:
    if asked is not None:
        return asked
    # The fused kernel wants every tensor floating point on CUDA; elsewhere keep the default.
    if params and all(p.is_cuda and p.is_floating_point() for p in params):
        return True
    return None


def build_optimizer(model: torch.nn.Module, options: UpdateOptions) -> torch.optim.Optimizer:
    """AdamW or SGD over the trainable parameters, grouped by ``param_groups``."""
    groups = param_groups(model, options)
    for group in groups:
        del group["names"]  # the optimizer state_dict must not depend on our bookkeeping
    if options.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=options.learning_rate, momentum=options.momentum, nesterov=options.nesterov)
    params = [p for g in groups for p in g["params"]]
    return torch.optim.AdamW(
        groups, lr=options.learning_rate, betas=options.betas, eps=options.eps, fused=_fused(params, options.fused)
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, options: UpdateOptions, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up, then constant, linear or cosine decay over ``schedule_steps`` (default: the run)."""
    steps = options.schedule_steps or total_steps
    warmup = options.warmup_steps or round(options.warmup_ratio * steps)
    return get_scheduler(_SCHEDULES[options.schedule], optimizer, num_warmup_steps=warmup, num_training_steps=steps)
