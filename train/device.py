"""Where a model runs and in which dtype: `auto` picks CUDA + bf16 where the GPU has it, else MPS,
else CPU; float32 everywhere else, because float16 overflows in activations of many models and
bf16 is slow on most CPUs. Under `torchrun`, each rank takes the GPU of its LOCAL_RANK."""

from __future__ import annotations

import gc
import os

import torch

from schemas.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def select_device(name: str) -> torch.device:
    """`auto` | `cuda` | `mps` | `cpu` → a torch.device; asking for one that is absent is a UserError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: torch sees no CUDA device; use --device auto or --device cpu")
        # Modulo the GPUs this process sees: one GPU per process (Slurm's --gpus-per-task=1) is cuda:0 for each.
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if name == "mps":
        if not _mps_available():
            raise UserError("--device mps: torch sees no MPS device; use --device auto or --device cpu")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise UserError(f"--device {name}: expected auto, cuda, mps or cpu")


def native_bf16(device: torch.device) -> bool:
    """A CUDA GPU with bf16 in hardware (Ampere on). torch's own check says yes by default where
    bf16 is only emulated (V100, T4), which is slower than float32 there."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def select_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` → bfloat16 on a CUDA GPU that has it in hardware, float32 otherwise; or the named dtype."""
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if name not in DTYPES:
        raise UserError(f"--dtype {name}: expected auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def empty_device_cache(device: torch.device) -> None:
    """Free what was just dropped and hand its memory back to the GPU (torch's allocator keeps it
    cached), so the next model's load can use it. A model held in a reference cycle is freed only
    by the collector, hence the collect first."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
