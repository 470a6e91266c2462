"""Process-group set-up for ``torchrun``: ranks are the engine's business, never a plugin's."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .precision import resolve_device


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    #: A one-process group this module started (FSDP2 needs a group even for one process).
    solo_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over processes, in place (a no-op in one process)."""
        if self.enabled:
            dist.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every process."""
        if not self.enabled:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.broadcast(t, src=0)
        return bool(t.item())


def init_distributed(device_name: str, needs_group: bool = False) -> Dist:
    """Pick the device and join the process group ``torchrun`` describes; one process otherwise.

    ``needs_group``: start a one-process group when there is no ``torchrun`` (FSDP2 shards
    over a device mesh, which needs one).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size <= 1:
        if needs_group and not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
            return Dist(device=device, solo_group=True)
        return Dist(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=dist.get_rank(), local_rank=local_rank, world_size=world_size, device=device)


def shutdown(d: Dist) -> None:
    """Leave the process group; after a run that finished, every process has passed a barrier first.

    That barrier (``train`` calls it) is what lets a process exit: gloo's worker threads may
    still be dropping the last collective's tensors, which takes the GIL, and the process
    group's destructor joins those threads while holding it, wherever the last reference
    goes (here, or later with a DDP wrapper). A rank that had nothing left to do (rank 1 of a
    GRPO run with no evaluation split: its last collective was the step's stop-flag broadcast)
    then hung in ``~ProcessGroupGloo`` forever. Waiting in the barrier, the GIL is free and
    the workers finish. The barrier alone was not enough (a 2-process DDP SFT run still hung
    once in CI, after rank 0 had reported), so the engine also keeps a finished run's trainer
    (and so its wrappers and process group) alive, and ``aligntk run`` leaves a multi-process
    run with ``os._exit(0)`` after flushing its output: no destructor runs.
    """
    if (d.enabled or d.solo_group) and dist.is_initialized():
        dist.destroy_process_group()
