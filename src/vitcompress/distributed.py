"""One process or many (``torchrun``): joining the process group, rank 0, reductions, devices.

Everything here is a no-op with one process, so stages call it unconditionally: ``dist_info()``
is rank 0 of 1, ``barrier()`` returns at once, ``all_reduce_sum`` and ``share`` return their
argument.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(timeout_minutes: float = 60.0) -> DistInfo:
    """Join the torchrun process group if launched by torchrun (WORLD_SIZE > 1); else one process.

    gloo on CPU, nccl on GPU. The long timeout leaves rank 0 time to analyse and plan while the
    others wait. Safe to call more than once.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistInfo(dist.get_rank(), local_rank, dist.get_world_size())


def dist_info() -> DistInfo:
    """The current process's place in the process group (one process when there is none)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size())
    return DistInfo()


def barrier() -> None:
    """Wait for every process (returns at once with one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def default_device(info: DistInfo | None = None) -> torch.device:
    """This process's GPU if there is one, else the CPU."""
    info = info or dist_info()
    return torch.device(f"cuda:{info.local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def reduce_device(device: torch.device) -> torch.device:
    """Where a tensor must be to be reduced across processes: nccl reduces CUDA tensors, gloo CPU ones."""
    return device if device.type == "cuda" else torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over every process, in place (``t`` itself with one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def share(obj: Any) -> Any:
    """Rank 0's value on every process (``obj`` itself with one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank_shard(count: int, info: DistInfo | None = None) -> Sequence[int]:
    """The indices of ``count`` items this process handles: every ``world_size``-th, from its rank."""
    info = info or dist_info()
    return range(info.rank, count, info.world_size)


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when ``enabled``; nothing elsewhere."""
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


__all__ = [
    "DistInfo", "all_reduce_sum", "autocast", "barrier", "default_device", "dist_info", "init_distributed",
    "rank_shard", "reduce_device", "share",
]  # fmt: skip
