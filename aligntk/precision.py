"""Device and precision choices, in one place.

``fp32`` runs in float32; ``bf16`` autocasts matmuls to bfloat16 with float32 master
weights; ``fp16`` autocasts to float16 and scales the loss with a gradient scaler so
small gradients do not underflow. Losses upcast logits to float32 themselves.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .errors import AligntkError

_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; a named device that is missing is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise AligntkError("train.device: cuda was asked for but no CUDA device is available")
        return torch.device("cuda", local_rank)
    if name == "mps" and not torch.backends.mps.is_available():
        raise AligntkError("train.device: mps was asked for but MPS is not available")
    return torch.device(name)


@dataclass
class Precision:
    """The autocast context and gradient scaler for one run."""

    name: str
    device: torch.device

    def __post_init__(self) -> None:
        self.dtype = _AUTOCAST[self.name]
        if self.name == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise AligntkError("train.precision: bf16 is not supported on this GPU; use fp16 or fp32")
        self.scaler = torch.amp.GradScaler(self.device.type) if self.name == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)
