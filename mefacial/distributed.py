"""torchrun set-up, written once (used by `mefacial generate` and `python -m train`): this process's ranks, its
device, and the process group."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
from typing import Sequence

import torch

from .errors import InputError


@dataclasses.dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun job (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE; 0, 1, 0, 1 when run
    alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # the job's processes on this machine

    @classmethod
    def from_env(cls) -> "Ranks":
        def number(name: str, default: int) -> int:
            value = os.environ.get(name, "")
            try:
                return int(value) if value else default
            except ValueError:
                raise InputError(f"${name}={value!r} is not an integer (set by torchrun)") from None

        ranks = cls(number("RANK", 0), number("WORLD_SIZE", 1), number("LOCAL_RANK", 0), number("LOCAL_WORLD_SIZE", 1))
        if not 0 <= ranks.rank < ranks.world:
            raise InputError(f"RANK={ranks.rank} is not in [0, WORLD_SIZE={ranks.world})")
        return ranks

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def shard(self, items: Sequence) -> list:
        """Every world-th item from this rank's index: over all ranks, each item exactly once."""
        return list(items[self.rank::self.world])

    def device(self, device: str) -> str:
        """The device of this rank: 'auto' / 'cuda' become cuda:LOCAL_RANK when CUDA is present."""
        if device in ("auto", "cuda") and torch.cuda.is_available():
            if self.local_rank >= torch.cuda.device_count():
                raise InputError(f"LOCAL_RANK {self.local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                                 "run at most one process per GPU (--nproc_per_node)")
            return f"cuda:{self.local_rank}"
        return device


def init_process_group(ranks: Ranks, device: torch.device | str = "cpu", timeout: dt.timedelta | None = None) -> bool:
    """Join the torchrun process group (NCCL for CUDA devices, gloo otherwise); False when alone or joined already."""
    import torch.distributed as dist

    if not ranks.distributed or not dist.is_available() or dist.is_initialized():
        return False
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, **({"timeout": timeout} if timeout is not None else {}))
    return True


def barrier() -> None:
    """Wait for every rank, when a process group is up."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
