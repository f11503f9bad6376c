"""`make gpu-check`: the model stages on the first CUDA machine, in one command, under 10 minutes.

On a machine without CUDA it says so in one line and exits 0. On a CUDA machine, with a Llama of
~100M parameters built from a config (nothing downloaded) and LLaMA-Factory's dpo_en_demo rows:

    precompute-ref   --dtype auto (bf16), --verify 8
    train ddp        all visible GPUs (torchrun), bf16 autocast over fp32 master weights
    train fsdp       all visible GPUs, FSDP2 with bf16 MixedPrecisionPolicy
    train lora       r=16 on the same shards (the reference is the base model)
    packing          precompute-ref in float32: prefix-shared rows with SDPA (the default), with
                     FlexAttention, and --packing (FlexAttention, auto on CUDA): log-probs within
                     the step-0 check's float32 tolerance of SDPA's, the scoring rate of each, and
                     --verify 8 (rows scored alone, FlexAttention's in whole tiles, equal the batched
                     values); then train --packing (FlexAttention forward and backward) in bf16
    iterate eval     the on-policy loop's eval stage (compare_policies: sample, judge, KL) on cuda:0
    kto              the rows ingested --unpaired, tokenized, scored; train --objective kto on all visible
                     GPUs in bf16 with the KL completions in their own no-gradient forward (--kl-completions
                     apart); with ≥ 2 GPUs, FSDP2 KTO on every GPU beside one GPU (the KL estimate's
                     all-reduce on NCCL, stand-in rows in the last batch)
    reward           train --objective reward on all visible GPUs in bf16 (a new score head: step 1 at log 2); with
                     ≥ 2 GPUs, FSDP2 reward training on every GPU beside one GPU
    reward last layer  on cuda:0, the reward model's last layer read at the scored tokens beside it run whole:
                     rewards and gradients, float32 and bf16 autocast
    resume           DDP on all visible GPUs in float32, killed (SIGKILL) as it writes its step-4 checkpoint and
                     resumed: the same losses, gradient norms and final weights as the run never stopped
    multi-GPU        with ≥ 2 GPUs: FSDP2 with --cpu-offload on every GPU; train DDP and FSDP2 in float32 on every GPU beside one GPU on the
                     same global batches (losses equal within float32 reduction order), and
                     precompute-ref on every GPU beside one (the same stored values); with one GPU,
                     one row saying these need two
    bench            benchmarks/run_all.py --quick on the GPU → bench-cuda.md / bench-cuda.json

Each DPO training run must start at loss log 2 (within bf16 rounding) and end lower; KTO at ½, finite. A stage that
fails is a row with its error and the check goes on (the first GPU time is scarce: one broken
stage must not cost the others' figures); the command then exits 1. Results: gpu-check.md and
gpu-check.json in --out (benchmarks/results/).

`--rehearse` (`make gpu-check-rehearsal`) runs the same stages on this CPU before any GPU time is
spent: two processes on gloo stand in for two GPUs, the bench's ~4M-parameter model for the 100M
one, a few steps on fewer rows, float32 (what `--dtype auto` picks on a CPU). It checks the
script itself (every command's options, every stage's figures and checks) and the multi-process
paths gloo shares with NCCL; what only CUDA has (bf16 autocast on the GPU, FlexAttention, NCCL,
device memory) it cannot, and the FlexAttention variant is a row saying so. Results:
gpu-check-rehearsal.md / .json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRAIN_ARGS = ["--batch-size", "8", "--log-every", "1"]  # β the default, 0.1 (sft and reward refuse one)


@dataclass(frozen=True)
class Rig:
    """Where the stages run and at what size: every visible GPU, or (--rehearse) two CPU processes
    on gloo with the bench's small model (`model` None), fewer rows and steps."""

    device: str
    processes: int
    rows: int
    max_length: int
    steps: int
    learning_rate: float  # full fine-tuning; LoRA's adapters take 10 times it
    model: dict[str, int] | None
    description: str
    report: str  # the results' file stem


def cuda_rig(gpus: int, name: str) -> Rig:
    return Rig("cuda", gpus, rows=400, max_length=1024, steps=30, learning_rate=1e-5,
               model=dict(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12, intermediate_size=2560),
               description=f"{gpus} × {name}, Llama ~100M from a config, 30 steps", report="gpu-check")


# A few steps of a small model must show the loss fall: 1e-5 barely moves it, 5e-3 overshoots (6.6 after 4 steps).
REHEARSAL = Rig("cpu", 2, rows=64, max_length=512, steps=6, learning_rate=3e-4, model=None, report="gpu-check-rehearsal",
                description="rehearsal on the CPU: 2 processes on gloo, the bench's ~4M-parameter Llama, 6 steps, float32")


class StageFailed(Exception):
    """A stage's command failed or its figures are wrong; the message says which and why."""


def _run(name: str, command: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if done.returncode:
        raise StageFailed(f"{name} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return time.perf_counter() - start


def _metrics(out: Path) -> list[dict]:
    """A train run's logged steps."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def _train(name: str, rig: Rig, model: Path, shards: Path, out: Path, *extra: str, start_loss: float = math.log(2),
           start_tolerance: float = 0.05, falls: bool = True) -> dict:
    """`start_loss`: the loss at step 1 (± `start_tolerance`), where the policy is the reference
    (DPO's log 2; KTO's ½). `falls`: the later steps' mean loss must be below it (not KTO's: its
    reference point, the KL estimate, grows as the policy moves, which raises the loss at first;
    its losses must be finite)."""
    seconds = _run(name, _torchrun(rig.processes, "train", "--shards", str(shards), "--model", str(model), "--out", str(out),
                                   *TRAIN_ARGS, "--learning-rate", str(rig.learning_rate), "--max-steps", str(rig.steps), *extra))
    metrics = _metrics(out)
    stats = json.loads((out / "manifest.json").read_text())["stats"]
    later = metrics[1:][-5:]  # up to the last five steps after the first
    first, last = metrics[0]["loss"], sum(m["loss"] for m in later) / len(later)
    if abs(first - start_loss) > start_tolerance or not math.isfinite(last) or (falls and not last < first):
        raise StageFailed(f"{name}: loss {first:.4f} at step 1 (expected {start_loss:.4f}) and {last:.4f} at the end")
    timed = [m for m in metrics if m["step"] > 1]
    tokens_per_s = sum(m["tokens"] for m in timed) / sum(m["tokens"] / m["tokens_per_s"] for m in timed)
    return {"stage": name, "seconds": seconds, "tokens_per_s": tokens_per_s, "first_loss": first, "last_loss": last,
            "peak_device_memory_mib": stats.get("peak_device_memory_mib"), "compiled_graphs": stats.get("compiled_graphs")}


def _ref_logps(shards: Path) -> dict[str, Any]:
    import polars as pl

    frame = pl.read_ipc(shards / "*.arrow").sort("id")
    return {name: frame[name].to_numpy() for name in ("ref_chosen_logps", "ref_rejected_logps")}


ATTENTION_VARIANTS = (  # precompute-ref, float32: the default layout's kernel beside FlexAttention, shared and packed
    ("precompute-ref fp32 shared (sdpa)", []),
    ("precompute-ref fp32 shared (flex)", ["--attn-implementation", "flex_attention"]),
    ("precompute-ref fp32 packed (flex)", ["--packing"]),
)


def _packing(rig: Rig, model: Path, shards: Path, work: Path) -> list[dict]:
    """float32 precompute-ref of the same shards prefix-shared with SDPA's dense mask (the default),
    shared with FlexAttention, and packed (FlexAttention): equal within the float32 tolerance of
    the trainer's step-0 check, and how fast each scores (whether FlexAttention should become the default on CUDA for
    unpacked rows too is decided by these rates). On a CPU, FlexAttention is refused (CUDA only) and
    --packing takes the dense block mask: the explicit FlexAttention variant is a skipped row."""
    results, values, skipped = [], {}, []
    for name, extra in ATTENTION_VARIANTS:
        if rig.device != "cuda" and "flex_attention" in extra:
            skipped.append({"stage": name, "skipped": "FlexAttention runs on CUDA only"})
            continue
        copy = work / name.replace(" ", "-")
        shutil.copytree(shards, copy)
        seconds = _run(name, [sys.executable, "-m", "prefdata", "precompute-ref", str(copy), "--model", str(model),
                              "--dtype", "float32", "--force", "--verify", "8", *extra])
        manifest = json.loads((copy / "manifest.json").read_text())
        values[name] = _ref_logps(copy)
        results.append({"stage": name, "seconds": seconds, "tokens_per_s": manifest["stats"]["tokens_per_s"], "dtype": "float32"})
    import numpy as np
    import torch

    from train.reference import VERIFY_TOLERANCE

    atol, rtol = VERIFY_TOLERANCE[torch.float32]  # what the trainer's step-0 check accepts
    baseline, *flex = values.values()
    for result, other in zip(results[1:], flex):
        result["max_abs_diff_vs_sdpa"] = max(float(abs(baseline[column] - other[column]).max()) for column in baseline)
        if not all(np.allclose(other[column], baseline[column], atol=atol, rtol=rtol) for column in baseline):
            raise StageFailed(f"{result['stage']}: reference log-probs differ from SDPA's by up to "
                              f"{result['max_abs_diff_vs_sdpa']:.3g} (tolerance {atol} + {rtol} × |value|)")
    return results + skipped


def _precompute(model: Path, shards: Path) -> dict:
    seconds = _run("precompute-ref", [sys.executable, "-m", "prefdata", "precompute-ref", str(shards), "--model", str(model),
                                      "--verify", "8"])
    manifest = json.loads((shards / "manifest.json").read_text())
    return {"stage": "precompute-ref", "seconds": seconds, "tokens_per_s": manifest["stats"]["tokens_per_s"],
            "dtype": manifest["reference"]["dtype"], "verify_max_abs_diff": manifest["stats"]["verify_max_abs_diff"]}


def _launcher(gpus: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus)]


def _torchrun(gpus: int, *module_and_args: str) -> list[str]:
    return [*_launcher(gpus), "-m", *module_and_args]


# Losses (absolute) and gradient norms (relative) of the same global batches on 1 and on N GPUs
# differ only in the order float32 sums add up.
MULTI_GPU_LOSS_TOLERANCE = 1e-4


def _multi_gpu_train(rig: Rig, model: Path, shards: Path, work: Path, parallelism: str, *extra: str) -> dict:
    """One GPU with N × 2 pairs per micro-batch beside N GPUs with 2 each, two micro-batches per
    step, over a whole epoch (its last batch leaves some GPUs without a pair: the stand-in row on
    NCCL): the same global batches, so the same losses and gradient norms. `extra`: more train
    options (KTO's), on both sides."""
    runs, gpus = {}, rig.processes
    label = " ".join([parallelism, *extra[1::2]])  # the option values name the run: "fsdp kto apart"
    for count in (1, gpus):
        out = work / f"{label.replace(' ', '-')}-{count}gpu"
        _run(f"train {parallelism} {count} GPU", _torchrun(count, "train", "--shards", str(shards), "--model", str(model),
                                                           "--out", str(out), "--learning-rate", "1e-5", "--log-every", "1",
                                                           "--epochs", "1", "--dtype", "float32", "--parallelism", parallelism,
                                                           "--gradient-accumulation-steps", "2",
                                                           "--batch-size", str(2 * gpus // count), *extra))
        runs[count] = _metrics(out)
    worst = max(abs(a[key] - b[key]) / (1 if key == "loss" else max(abs(a[key]), 1e-6))
                for a, b in zip(runs[1], runs[gpus], strict=True) for key in ("loss", "grad_norm"))
    if worst > MULTI_GPU_LOSS_TOLERANCE:
        raise StageFailed(f"train {label} on {gpus} GPUs: losses or gradient norms differ from one GPU's by up to "
                          f"{worst:.3g}")
    return {"stage": f"train {label} {gpus} GPUs = 1 GPU (fp32)", "seconds": float("nan"), "tokens_per_s": float("nan"),
            "first_loss": runs[gpus][0]["loss"], "last_loss": runs[gpus][-1]["loss"], "max_diff": worst}


def _multi_gpu_precompute(rig: Rig, model: Path, shards: Path, work: Path) -> dict:
    """precompute-ref on every GPU (each its share of the shards) stores one GPU's values."""
    values, gpus = {}, rig.processes
    for count in (1, gpus):
        copy = work / f"precompute-{count}gpu"
        shutil.copytree(shards, copy)
        _run(f"precompute-ref {count} GPU", _torchrun(count, "prefdata", "precompute-ref", str(copy), "--model", str(model),
                                                      "--dtype", "float32", "--force"))
        values[count] = _ref_logps(copy)
    worst = max(float(abs(values[1][c] - values[gpus][c]).max()) for c in values[1])
    if worst > 1e-3:
        raise StageFailed(f"precompute-ref on {gpus} GPUs: stored values differ from one GPU's by up to {worst:.3g}")
    return {"stage": f"precompute-ref {gpus} GPUs = 1 GPU (fp32)", "seconds": float("nan"), "tokens_per_s": float("nan"),
            "max_abs_diff": worst}


def _multi_gpu(rig: Rig, model: Path, shards: Path, work: Path) -> list[dict]:
    if rig.processes < 2:
        return [{"stage": "multi-GPU (DDP, FSDP2, precompute-ref)", "skipped": f"needs 2 GPUs; {rig.processes} visible"}]
    # --cpu-offload on several GPUs: the non-loading ranks' buffers must reach the GPU before rank 0's
    # broadcast (parallel.shard), a path one GPU never takes; train refuses it on the CPU (nothing to move).
    offload = {"stage": "train fsdp cpu-offload", "skipped": "--cpu-offload moves shards off a GPU"} if rig.device != "cuda" \
        else _train("train fsdp cpu-offload", rig, model, shards, work / "fsdp-offload", "--parallelism", "fsdp", "--cpu-offload")
    return [_multi_gpu_train(rig, model, shards, work, "ddp"), _multi_gpu_train(rig, model, shards, work, "fsdp"),
            offload, _multi_gpu_precompute(rig, model, shards, work)]


REWARD = ("--objective", "reward")


def _reward(rig: Rig, model: Path, shards: Path, work: Path) -> list[dict]:
    """The reward model on the same shards: bf16 on every GPU; with ≥ 2 GPUs, FSDP2 on every GPU
    beside one GPU. The score head is new, its weights N(0, 0.02²), so each reward starts near 0,
    but its spread grows with the width (~0.5 at 768): step 1's loss is log 2 within 0.25, not
    DPO's 0.05, and must fall."""
    rows = [_train("train reward", rig, model, shards, work / "reward", *REWARD, start_tolerance=0.25)]
    if rig.processes >= 2:
        rows.append(_multi_gpu_train(rig, model, shards, work, "fsdp", *REWARD))
    return rows


# Rewards and gradients of the last layer read at the scored tokens beside the layer whole, as a
# share of each tensor's largest |value| (at least a thousandth of the largest gradient's, for
# tensors whose gradient is all but zero): float32 rounding, and bf16 autocast's (8 mantissa bits).
LAST_LAYER_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}


def _reward_last_layer(rig: Rig, model: Path, shards: Path) -> dict:
    """On the first device (cuda:0, or the CPU rehearsing), 8 of the shards' pairs prefix-shared
    through the reward model with its last layer read at each answer's last token
    (train/last_layer.py), beside the same model with that layer run whole: rewards and every
    parameter's gradient agree within LAST_LAYER_TOLERANCE, in float32 and under bf16 autocast
    (the CUDA kernels the CPU tests cannot run). In this process: any failure is the stage's."""
    import torch

    from schemas.errors import UserError

    try:
        return _compare_last_layer(rig, model, shards)
    except (UserError, RuntimeError) as error:  # torch.OutOfMemoryError is a RuntimeError
        raise StageFailed(f"reward last layer: {type(error).__name__}: {error}") from error
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the later stages' processes share cuda:0


def _compare_last_layer(rig: Rig, model: Path, shards: Path) -> dict:
    import numpy as np
    import torch

    from train.batching import collate_pairs
    from train.data import open_shards
    from train.losses import reward_loss
    from train.models import padding_id
    from train.rewards import RewardScorer, load_reward_model, pair_rewards

    device = torch.device("cuda:0" if rig.device == "cuda" else "cpu")
    reward_model, tokenizer = load_reward_model(model, str(model), torch.float32, device)
    if not RewardScorer(reward_model).reads_last_layer:
        raise StageFailed(f"reward last layer: {type(reward_model).__name__} "
                          f"({reward_model.config._attn_implementation}) does not read its last layer at the scored tokens")
    _, data, _ = open_shards(str(shards), need_ref=False)
    batch = collate_pairs(data.columns, np.arange(min(8, len(data))), padding_id(tokenizer), shared=True).to(device)
    start, result = time.perf_counter(), {"stage": "reward last layer read vs whole", "tokens_per_s": float("nan")}
    for dtype in ("float32", "bfloat16"):
        runs = []
        for reads in (True, False):
            scorer = RewardScorer(reward_model)
            scorer.reads_last_layer = reads
            reward_model.zero_grad()
            with torch.autocast(device.type, dtype=getattr(torch, dtype), enabled=dtype != "float32"):
                chosen, rejected = pair_rewards(scorer, batch)
            reward_loss(chosen, rejected)[0].backward()
            runs.append([torch.cat([chosen, rejected]).detach(), *(p.grad.clone() for p in reward_model.parameters())])
        floor = 1e-3 * max(float(grad.abs().max()) for grad in runs[1][1:])
        share = max(float((a - b).abs().max()) / max(float(b.abs().max()), floor) for a, b in zip(*runs))
        result[f"max_relative_diff_{dtype}"] = share
        if not share <= LAST_LAYER_TOLERANCE[dtype]:
            raise StageFailed(f"reward last layer ({dtype}): read at the scored tokens, a reward or gradient differs from the "
                              f"whole layer's by {share:.3g} of its largest value (tolerance {LAST_LAYER_TOLERANCE[dtype]})")
    return {**result, "seconds": time.perf_counter() - start}


KILLED_RUN = ROOT / "benchmarks" / "killed_run.py"
RESUME_STEPS, SAVE_EVERY, KILLED_AT = 8, 2, 4  # killed writing checkpoint 4: checkpoint 2 is the last whole one
# Eager attention, whose backward adds no atomics (the fused SDPA kernels' may), and cuBLAS's fixed
# workspace: the same steps give the same numbers run to run, so a resume that lost state shows.
DETERMINISTIC = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
RESUME_TOLERANCE = 1e-6


def _resume(rig: Rig, model: Path, shards: Path, work: Path) -> dict:
    """DDP on every GPU, float32, killed (SIGKILL) as it writes checkpoint 4's trainer state and
    run again with --resume from checkpoint 2, beside the same run never stopped: steps 3..8 must
    log the same losses and gradient norms, and the final weights be the same. On CUDA that is the
    fused AdamW state and the GPU generators' states coming back onto the GPU under NCCL."""
    args = ["--shards", str(shards), "--model", str(model), *TRAIN_ARGS, "--learning-rate", str(10 * rig.learning_rate),
            "--max-steps", str(RESUME_STEPS), "--save-every", str(SAVE_EVERY), "--dtype", "float32", "--attn-implementation", "eager"]
    whole, killed = work / "resume-whole", work / "resume-killed"
    _run("train (never stopped)", _torchrun(rig.processes, "train", *args, "--out", str(whole)), DETERMINISTIC)
    died = subprocess.run([*_launcher(rig.processes), str(KILLED_RUN), str(KILLED_AT), *args, "--out", str(killed)],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, **DETERMINISTIC})
    _check_died_at_checkpoint(died, killed)
    _run("train --resume", _torchrun(rig.processes, "train", *args, "--resume", "--out", str(killed)), DETERMINISTIC)
    logged = {}
    for name, out in (("whole", whole), ("resumed", killed)):
        logged[name] = _metrics(out)
    if [m["step"] for m in logged["resumed"]] != [m["step"] for m in logged["whole"]]:
        raise StageFailed(f"resume: steps {[m['step'] for m in logged['resumed']]} logged, not 1..{RESUME_STEPS}")
    worst = max(abs(a[key] - b[key]) / max(abs(a[key]), 1e-6)
                for a, b in zip(logged["whole"], logged["resumed"]) for key in ("loss", "grad_norm"))
    weights = _max_weight_difference(whole / "final", killed / "final")
    if worst > RESUME_TOLERANCE or weights > RESUME_TOLERANCE:
        raise StageFailed(f"resume: the resumed run's losses or gradient norms differ from the uninterrupted run's by up to "
                          f"{worst:.3g} (relative), its final weights by up to {weights:.3g}")
    return {"stage": f"train ddp killed at checkpoint {KILLED_AT}, resumed = never stopped (fp32)", "seconds": float("nan"),
            "tokens_per_s": float("nan"), "first_loss": logged["resumed"][0]["loss"], "last_loss": logged["resumed"][-1]["loss"],
            "max_diff": max(worst, weights)}


def _check_died_at_checkpoint(died: subprocess.CompletedProcess, out: Path) -> None:
    """The killed run died as meant: by SIGKILL, after logging steps 1..KILLED_AT, with checkpoint
    KILLED_AT half-written and the one before it the last whole one (what --resume must pick)."""
    from train.parallel import latest_checkpoint

    steps = [m["step"] for m in _metrics(out)] if (out / "metrics.jsonl").is_file() else []
    last = latest_checkpoint(out)
    if died.returncode == 0 or "SIGKILL" not in died.stderr or steps != list(range(1, KILLED_AT + 1)) \
            or last is None or last.name != f"checkpoint-{KILLED_AT - SAVE_EVERY:07d}":
        raise StageFailed(f"resume: the run meant to die writing checkpoint {KILLED_AT} exited {died.returncode} after steps "
                          f"{steps}, last whole checkpoint {last}:\n{died.stderr[-4000:]}")


def _max_weight_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    first, second = ({k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()} for folder in (a, b))
    if not first or first.keys() != second.keys():
        raise StageFailed(f"resume: {a} and {b} hold different tensors")
    return max(float((first[name].float() - second[name].float()).abs().max()) for name in first)


KTO = ("--objective", "kto", "--kl-completions", "apart")


def _kto(rig: Rig, model: Path, work: Path) -> list[dict]:
    """KTO on the same rows ingested --unpaired: bf16 on every GPU, and with ≥ 2 GPUs FSDP2 on
    every GPU beside one GPU (the all-reduced KL estimate and the no-gradient KL forward on NCCL)."""
    from benchmarks.bench_kto import unpaired_shards
    from benchmarks.bench_precompute import DUMP

    shards = unpaired_shards(work / "kto", model, rig.rows, rig.max_length, DUMP)
    rows = [_train("train kto (KL apart)", rig, model, shards, work / "kto-train", *KTO, start_loss=0.5, falls=False)]
    if rig.processes >= 2:
        rows.append(_multi_gpu_train(rig, model, shards, work / "kto", "fsdp", *KTO))
    return rows


def _iterate_eval(rig: Rig, policy: Path, baseline: Path, records: Path) -> dict:
    """iterate's eval stage on the first device: both models sample, the demo's lexicon judge scores, KL."""
    import pyarrow.parquet as pq

    from train.eval import compare_policies
    from train.judge import JudgeOptions

    prompts = pq.read_table(records / "records.parquet", columns=["prompt"]).column("prompt").to_pylist()[:16]
    start = time.perf_counter()
    result = compare_policies(str(policy), str(baseline), prompts, JudgeOptions(reward="demo.data:lexicon_reward", device=rig.device),
                              n=2, temperature=1.0, top_p=1.0, max_new_tokens=32, seed=0, device=rig.device,
                              chat_template_kwargs={})
    if not math.isfinite(result["kl"]):
        raise StageFailed(f"iterate eval on {rig.device}: KL is {result['kl']}")
    return {"stage": f"iterate eval ({rig.device})", "seconds": time.perf_counter() - start, "tokens_per_s": float("nan"),
            "kl": result["kl"]}


def _bench_quick(out: Path) -> dict:
    """The bench-quick table on the GPU (bench-cuda.md); its own figures are in that file."""
    seconds = _run("bench-quick", [sys.executable, "benchmarks/run_all.py", "--quick", "--out", str(out)])
    return {"stage": "bench-quick (bench-cuda.md)", "seconds": seconds, "tokens_per_s": float("nan")}


def run_stages(stages: list[tuple[str, Callable[[], dict | list[dict]]]]) -> tuple[list[dict], list[str]]:
    """Each stage in turn: (its result rows, a row per failed stage included; the failures' messages)."""
    results, failures = [], []
    for name, stage in stages:
        try:
            produced = stage()
        except StageFailed as failure:
            failures.append(str(failure))
            results.append({"stage": name, "error": str(failure).splitlines()[0]})
            continue
        results.extend(produced if isinstance(produced, list) else [produced])
    return results, failures


def report_lines(results: list[dict], header: str) -> list[str]:
    lines = [header, "", "| stage | seconds | tokens/s | step-1 loss | mean loss, last ≤ 5 later steps | peak GPU MiB (rank 0) "
             "| compiled graphs |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r or "skipped" in r:
            lines.append(f"| {r['stage']} | {'failed: ' + r['error'] if 'error' in r else r['skipped']} | | | | | |")
            continue
        lines.append(f"| {r['stage']} | {r['seconds']:.0f} | {r['tokens_per_s']:,.0f} | {r.get('first_loss', float('nan')):.4f} | "
                     f"{r.get('last_loss', float('nan')):.4f} | {r.get('peak_device_memory_mib') or '—'} | "
                     f"{r.get('compiled_graphs', '—')} |")
    return lines


STAGES = ("precompute-ref", "train ddp", "train fsdp", "train lora", "packing", "train packed (flex)", "iterate eval",
          "multi-GPU", "kto", "reward", "reward last layer", "resume", "bench")


def check(rig: Rig, work: Path, only: set[str] | None = None) -> tuple[list[dict], list[str]]:
    """Every stage on `rig`, or those in `only` and what they need (precompute-ref always: the
    shards the others train on need its log-probs; iterate eval samples from train ddp's policy):
    (result rows, failures' messages)."""
    from benchmarks.bench_precompute import prepare
    from train.tiny import build_model

    small, shards = prepare(work, rows=rig.rows, max_length=rig.max_length)
    model = build_model(small, work / "model-100m", max_positions=rig.max_length, **rig.model) if rig.model else small
    stages = [
        ("precompute-ref", lambda: _precompute(model, shards)),
        ("train ddp", lambda: _train("train ddp", rig, model, shards, work / "ddp")),
        ("train fsdp", lambda: _train("train fsdp", rig, model, shards, work / "fsdp", "--parallelism", "fsdp")),
        ("train lora", lambda: _train("train lora", rig, model, shards, work / "lora", "--lora-r", "16",
                                      "--learning-rate", str(10 * rig.learning_rate))),
        ("packing", lambda: _packing(rig, model, shards, work)),
        ("train packed (flex)", lambda: _train("train packed (flex)", rig, model, shards, work / "packed", "--packing")),
        ("iterate eval", lambda: _iterate_eval(rig, work / "ddp" / "final", model, work / "records")),
        ("multi-GPU", lambda: _multi_gpu(rig, model, shards, work)),
        ("kto", lambda: _kto(rig, model, work)),
        ("reward", lambda: _reward(rig, model, shards, work)),
        ("reward last layer", lambda: _reward_last_layer(rig, model, shards)),
        ("resume", lambda: _resume(rig, model, shards, work)),
    ]
    assert [name for name, _ in stages] == list(STAGES[:-1])
    needed = None if only is None else {"precompute-ref", *only, *(["train ddp"] if "iterate eval" in only else [])}
    return run_stages([(name, stage) for name, stage in stages if needed is None or name in needed])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--no-bench", action="store_true", help="skip the bench-quick table")
    parser.add_argument("--rehearse", action="store_true",
                        help="run the stages on this CPU (2 gloo processes, a small model) to check the script before GPU time")
    parser.add_argument("--stages", help=f"comma-separated, only these and what they need (precompute-ref; train ddp for "
                        f"iterate eval): {', '.join(STAGES)}")
    args = parser.parse_args()
    only = None if args.stages is None else {name.strip() for name in args.stages.split(",")}
    if only is not None and only - set(STAGES):
        parser.error(f"--stages: no stage {', '.join(sorted(only - set(STAGES)))}; the stages: {', '.join(STAGES)}")
    import torch

    if args.rehearse:
        rig = REHEARSAL
    elif torch.cuda.is_available():
        rig = cuda_rig(torch.cuda.device_count(), torch.cuda.get_device_name(0))
    else:
        print("gpu-check: no CUDA device visible to torch on this machine; nothing to check (exit 0; "
              "--rehearse runs it on the CPU)")
        return
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        results, failures = check(rig, Path(tmp), only)
    if not args.no_bench and rig.device == "cuda" and (only is None or "bench" in only):  # on a CPU, make bench-quick is that table
        bench_rows, bench_failures = run_stages([("bench-quick", lambda: _bench_quick(args.out))])
        results, failures = results + bench_rows, failures + bench_failures
    report = {"processes": rig.processes, "device": rig.description, "torch": torch.__version__, "results": results,
              "failures": failures}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{rig.report}.json").write_text(json.dumps(report, indent=2))
    lines = report_lines(results, f"{rig.description}, torch {torch.__version__}")
    (args.out / f"{rig.report}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if failures:
        sys.exit("gpu-check: " + "\n\ngpu-check: ".join(failures))


if __name__ == "__main__":
    main()
