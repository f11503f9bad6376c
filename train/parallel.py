"""How the scorer is spread over the processes of a `torchrun` job, and how its state is saved.

- `ddp` (the default): every process holds the whole model; `DistributedDataParallel` averages
  gradients. ~16 bytes per trained parameter per process (fp32 weights, gradients, AdamW m and v).
- `fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`) on each decoder layer, then on the scorer
  as root (embeddings, final norm, LM head). Each process keeps 1/W of the weights, gradients and
  optimizer state; a layer's weights are all-gathered just before it runs and freed after. On a
  GPU with bf16, `MixedPrecisionPolicy` computes in bf16 and reduces gradients in fp32 over fp32
  master weights; on CPU everything stays fp32. `cpu_offload` keeps the shards in host memory.

Checkpoints go through `torch.distributed.checkpoint` for both: each process writes its own
shard of the model and optimizer state, and its random generators (its GPU's included), into one
directory (a single process writes it whole), renamed into place by rank 0 once every process has
written, so a checkpoint is whole or absent.
The final model is gathered to rank 0 as one full state dict and saved with `save_pretrained`.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from train.device import select_dtype
from train.distributed import Dist

STATE_FILE = "trainer_state.pt"


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks FSDP shards one by one: the modules transformers names in
    `_no_split_modules` (LlamaDecoderLayer, Qwen2DecoderLayer, …), which is what it keeps whole
    when it splits a model over devices."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        from schemas.errors import UserError

        raise UserError(f"--parallelism fsdp: cannot find the decoder layers of {type(model).__name__} "
                        "(its _no_split_modules is empty); use --parallelism ddp")
    return layers


def mixed_precision(device: torch.device, dtype_name: str) -> Any:
    """bf16 compute with fp32 gradient reduction where bf16 runs fast (a CUDA GPU that has it);
    None (plain fp32) elsewhere."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    bf16 = device.type == "cuda" and select_dtype(dtype_name, device) == torch.bfloat16
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None


def loads_weights(dist: Dist, parallelism: str) -> bool:
    """Whether this process reads the model's weights from disk. Under FSDP only rank 0 does, and
    `shard` sends every process its part: one full copy in host memory per machine instead of one
    per process (8 × 280 GB for a 70B model in fp32 otherwise)."""
    return parallelism != "fsdp" or dist.is_main


def shard(scorer: torch.nn.Module, model: torch.nn.Module, device: torch.device, mp_policy: Any,
          cpu_offload: bool, dist: Dist) -> torch.nn.Module:
    """FSDP2 in place: each decoder layer, then the scorer as root. Returns the scorer. On rank
    0 `model` holds the weights (on the CPU); on the other ranks its parameters are on the meta
    device (`loads_weights`). Each process ends with its shard on `device`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.world,))
    options: dict[str, Any] = {"mesh": mesh}
    if mp_policy is not None:
        options["mp_policy"] = mp_policy
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    full_state = scorer.state_dict() if dist.is_main else {}
    for layer in decoder_layers(model):
        fully_shard(layer, **options)
    fully_shard(scorer, **options)
    if dist.world > 1:
        if not dist.is_main:
            scorer.to_empty(device=torch.device("cpu") if cpu_offload else device)
            # fully_shard moved rank 0's buffers to `device` whatever the offload policy (it offloads
            # parameters only): the broadcast below needs them on the same device on every rank.
            for module in scorer.modules():
                for name, buffer in module._buffers.items():
                    if buffer is not None and buffer.device != device:
                        module._buffers[name] = torch.empty_like(buffer, device=device)
        set_model_state_dict(scorer, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        # Buffers computed at construction (rotary frequencies) are not in a state dict.
        for buffer in scorer.buffers():
            dist.broadcast(buffer)
    return scorer


def equal_shares(batches: list[np.ndarray], dist: Dist, sharded: bool) -> list[tuple[np.ndarray, bool]]:
    """This process's batches (every world-th), each with whether it counts. Under FSDP every
    process must run the same number of forwards (each gathers weights with the others), so the
    short shares are topped up with a repeat of a batch that is not counted."""
    mine = [(rows, True) for rows in batches[dist.rank::dist.world]]
    if sharded and batches:
        mine += [(batches[0], False)] * (-(-len(batches) // dist.world) - len(mine))
    return mine


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def wrap(scorer: torch.nn.Module, model: torch.nn.Module, parallelism: str, device: torch.device, dtype_name: str,
         cpu_offload: bool, dist: Dist) -> torch.nn.Module:
    if parallelism == "fsdp":
        return shard(scorer, model, device, mixed_precision(device, dtype_name), cpu_offload, dist)
    if dist.world > 1:
        # Every process read the same weight files, so only what it initialised itself (a LoRA
        # adapter) needs rank 0's values; DDP's own start-up broadcast would send the frozen base
        # too, through buckets of 250 MB that raise the peak of a LoRA run by that much.
        for param in scorer.parameters():
            if param.requires_grad:
                dist.broadcast(param.data)
        # Gradients as views into DDP's all-reduce buckets: without it the buckets are a second
        # copy of every gradient (4 bytes per parameter more).
        return torch.nn.parallel.DistributedDataParallel(scorer, device_ids=[device.index] if device.type == "cuda" else None,
                                                         gradient_as_bucket_view=True, init_sync=False)
    return scorer


def unwrap(scorer: torch.nn.Module) -> torch.nn.Module:
    """The module whose parameters the optimizer holds: DDP's inner module; an FSDP2 module is
    itself (fully_shard works in place)."""
    return getattr(scorer, "module", scorer)


def reshard(scorer: torch.nn.Module) -> None:
    """Free the gathered weights after a forward with no backward (eval, the step-0 check). FSDP
    keeps the root's weights gathered after its forward, for the backward that would follow;
    without one they would stay whole, and an optimizer built then would hold them."""
    if is_sharded(scorer):
        scorer.reshard()


@contextmanager
def gradient_sync(scorer: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulated step. FSDP
    reduce-scatters every micro-batch: with the sync off, FSDP2 keeps each gradient whole (fp32)
    on every process until the step, the whole model's gradients where its point is 1/W of them;
    reduced each time, the shards' gradients add up to the same sum."""
    if isinstance(scorer, torch.nn.parallel.DistributedDataParallel) and not enabled:
        with scorer.no_sync():
            yield
    else:
        yield


def clip_gradients(parameters: list[torch.nn.Parameter], max_norm: float | None) -> float:
    """Clip by the global norm (over every process's shard under FSDP) and return it."""
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm or float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _state_options(**extra: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Frozen parameters (the base model under LoRA) are the model directory's weights: not saved.
    return StateDictOptions(ignore_frozen_params=True, **extra)


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every random generator this process draws from: Python's, NumPy's, torch's CPU one and, on a
    GPU, that GPU's own (dropout masks of CUDA tensors come from it, not from the CPU's)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device, checkpoint: Path, gpu_random_used: bool = True) -> None:
    """`rng_state`'s generators back as they were. A checkpoint written without a GPU's state (on
    the CPU, or by a version that saved the CPU's alone) cannot continue a GPU run that draws GPU
    random numbers (dropout) exactly; one that draws none continues it as it was."""
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    elif device.type == "cuda" and gpu_random_used:
        from schemas.errors import UserError

        raise UserError(f"--resume: {checkpoint} holds no CUDA random state (written on the CPU or by an older "
                        f"prefdata), and this run's dropout draws on {device}'s, so it cannot continue it exactly; "
                        "start without --resume")
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def latest_checkpoint(out: Path) -> Path | None:
    done = sorted(p for p in out.glob("checkpoint-*") if (p / STATE_FILE).is_file())
    return done[-1] if done else None


def save_checkpoint(final: Path, scorer: torch.nn.Module, optimizer: Any, trainer_state: dict[str, Any], dist: Dist) -> None:
    """Every process writes its shard and its RNG state; rank 0 writes the trainer state last and
    renames the directory into place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp = final.parent / f".tmp-{final.name}"
    if dist.is_main and tmp.exists():
        shutil.rmtree(tmp)
    dist.barrier()
    model_state, optim_state = get_state_dict(unwrap(scorer), optimizer, options=_state_options())
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp / "state", no_dist=dist.world == 1)
    torch.save(rng_state(dist.device), tmp / f"rng-{dist.rank}.pt")
    dist.barrier()
    if dist.is_main:
        torch.save(trainer_state, tmp / STATE_FILE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    dist.barrier()


def load_checkpoint(checkpoint: Path, scorer: torch.nn.Module, optimizer: Any, dist: Dist,
                    gpu_random_used: bool = True) -> dict[str, Any]:
    """Model and optimizer state into the (already wrapped) scorer and optimizer, this process's
    RNG state (`restore_rng_state`); returns the trainer state rank 0 saved."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(unwrap(scorer), optimizer, options=_state_options())
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=checkpoint / "state", no_dist=dist.world == 1)
    # The AdamW kernel is this run's (train.loop.adamw), not the checkpoint's: a checkpoint from
    # before the fused kernel would switch it off again, and load_state_dict places each `step`
    # where the kernel named in the groups needs it.
    for group in state["optim"]["param_groups"]:
        group.update({key: optimizer.defaults[key] for key in ("fused", "foreach", "capturable") if key in optimizer.defaults})
    # Not strict: under LoRA the frozen base is absent from `state` by design (`_state_options`),
    # and load_state_dict would call each base weight missing. Every trainable key is there: dcp.load
    # filled exactly the keys get_state_dict listed, and fails on any the checkpoint lacks.
    set_state_dict(unwrap(scorer), optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_state_options(strict=False))
    restore_rng_state(torch.load(checkpoint / f"rng-{dist.rank}.pt", weights_only=False), dist.device, checkpoint,
                      gpu_random_used)
    return torch.load(checkpoint / STATE_FILE, weights_only=False)


def full_state_dict(scorer: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The model's weights gathered whole on rank 0's CPU (an empty dict on the other ranks), keyed
    as the causal LM names them, each tied weight once (the gathered copies no longer share
    memory, so `save_pretrained` would write both). Every process must call it: under FSDP it is
    a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    module = unwrap(scorer)
    state = get_model_state_dict(module, options=options)
    first_name: dict[int, str] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        first_name.setdefault(id(param), name)
    tied = {name for name, param in module.named_parameters(remove_duplicate=False) if first_name[id(param)] != name}
    return {key.removeprefix("model."): value for key, value in state.items() if key not in tied}
