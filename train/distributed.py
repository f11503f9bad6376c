"""The one owner of ranks and devices for every model stage (train, precompute-ref, eval, generate).

Under `torchrun` each process takes the GPU of its LOCAL_RANK (`torch.cuda.set_device`, so that
NCCL work and any `cuda` tensor without an index land there, not all on cuda:0) and joins one
process group whose backend serves every device a collective can see: `cpu:gloo,cuda:nccl` where
CUDA is used, so metric totals kept on the CPU cross ranks through gloo and model tensors through
NCCL. Every collective our code makes goes through `Dist`; torch's own (DDP, FSDP2, DCP) use the
same group. Without torchrun (WORLD_SIZE unset) it is one process and every call is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from schemas.errors import UserError
from train.device import select_device


def backend_for(device: torch.device) -> str:
    """The process-group backend for processes computing on `device`: NCCL has no CPU tensors, so
    on CUDA gloo serves the CPU side."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def served_devices(backend: str) -> set[str]:
    """The device types a backend string moves tensors for: "cpu:gloo,cuda:nccl" → {cpu, cuda}."""
    if ":" in backend:
        return {pair.split(":")[0] for pair in backend.split(",")}
    return {"gloo": {"cpu"}, "nccl": {"cuda"}}.get(backend, set())


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    device: torch.device  # where this process computes: cuda:LOCAL_RANK, mps or cpu

    @classmethod
    def start(cls, device_name: str, timeout: timedelta) -> Dist:
        """Pick this process's device (`auto` | `cuda` | `mps` | `cpu`), bind it, join the group."""
        device = select_device(device_name)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and device.type == "mps":
            raise UserError("torchrun on MPS: no process-group backend carries MPS tensors; run one process, or --device cpu")
        if world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend_for(device), timeout=timeout)
        return cls(int(os.environ.get("RANK", "0")), world, device)

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

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Rank 0's values into `tensor` on every process, in place."""
        if self.world > 1:
            torch.distributed.broadcast(tensor, src=0)

    def gather_objects(self, value: Any) -> list[Any]:
        """Every process's `value` (picklable), in rank order, on every process."""
        if self.world == 1:
            return [value]
        gathered: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(gathered, value)
        return gathered

    def barrier(self, timeout: timedelta | None = None) -> None:
        """`timeout`: longer than the group's, where the others wait on rank 0's own long work."""
        if self.world > 1:
            torch.distributed.barrier(timeout=timeout)
