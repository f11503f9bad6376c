"""The processes of a `torchrun` job, for both model stages: rank, world size, and the few
collectives they use. Without torchrun (WORLD_SIZE unset) it is one process and every call is a no-op."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int

    @classmethod
    def start(cls, backend: str, timeout: timedelta) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend, timeout=timeout)
        return cls(int(os.environ.get("RANK", "0")), world)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            values = values.clone()
            torch.distributed.all_reduce(values)
        return values

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        return self.sum(values) / self.world

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()
