"""Run a module (`python -m tests.collective_probe MODULE ARGS…`, under torchrun) with every
torch.distributed collective wrapped: each call's function, the devices of its tensors, the
backend string the process group was started with, and which file called it are written to
$COLLECTIVE_PROBE_DIR/rank-N.jsonl when the process exits.

What a CPU run can show of a GPU run's failures: a collective our code makes outside the one
owner of ranks (train/distributed.py), where the backend is chosen for every device at once. It
cannot show a CPU tensor sent through NCCL itself: on the CPU the backend is gloo and every tensor
is a CPU tensor, so the device check only holds the line (a meta or MPS tensor would fail it); that
the CUDA plan's backend serves the CPU is tests/test_multiprocess.py's CUDA plan test. DDP's
gradient all-reduce runs in C++ and is not seen here."""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "reduce_scatter",
               "reduce", "all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list", "barrier",
               "all_to_all_single", "send", "recv")
CALLS: list[dict[str, Any]] = []
STATE = {"backend": None}


def _devices(args: tuple, kwargs: dict) -> list[str]:
    found: list[str] = []
    for value in [*args, *kwargs.values()]:
        items = value if isinstance(value, (list, tuple)) else [value]
        found += [item.device.type for item in items if isinstance(item, torch.Tensor)]
    return sorted(set(found))


def _wrap(name: str, original: Any) -> Any:
    def recorded(*args: Any, **kwargs: Any) -> Any:
        caller = sys._getframe(1).f_code.co_filename
        CALLS.append({"function": name, "devices": _devices(args, kwargs), "backend": STATE["backend"], "caller": caller})
        return original(*args, **kwargs)

    return recorded


def _wrap_init(original: Any) -> Any:
    def init(backend: Any = None, *args: Any, **kwargs: Any) -> Any:
        STATE["backend"] = str(backend)
        return original(backend, *args, **kwargs)

    return init


def _write() -> None:
    out = Path(os.environ["COLLECTIVE_PROBE_DIR"])
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"rank-{os.environ.get('RANK', '0')}-{os.getpid()}.jsonl"
    path.write_text("".join(json.dumps(call) + "\n" for call in CALLS))


def main() -> None:
    for name in COLLECTIVES:
        setattr(dist, name, _wrap(name, getattr(dist, name)))
    dist.init_process_group = _wrap_init(dist.init_process_group)
    atexit.register(_write)
    module, *args = sys.argv[1:]
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
