"""Training memory per process at model scale: DDP, FSDP2 and LoRA beside TRL (issue 13).

    .venv/bin/python benchmarks/bench_memory.py [--quick | --size large] [--variants …] [--procs 2] [--steps 4] [--json PATH]

A Llama of ~100M parameters (~15M with --quick) built from a config, the same rows
(LLaMA-Factory's dpo_en_demo, tokenized by prefdata, reference precomputed once), float32, on
the GPUs where torch sees CUDA (each process its LOCAL_RANK's, NCCL beside gloo: the trainer's own
`Dist` choice) and else the CPU (gloo), `--procs` processes under torchrun, `BATCH_SIZE` pairs per
process per step, sigmoid loss,
activation checkpointing on for every variant (TRL's default; `--no-gradient-checkpointing`
turns it off on both sides), so the table measures the training state more than activations:

    ours-ddp        python -m train --parallelism ddp
    ours-fsdp       python -m train --parallelism fsdp
    ours-lora       python -m train --lora-r 16 (DDP)
    trl-precompute  TRL DPOTrainer(precompute_ref_log_probs=True), full fine-tuning
    trl-lora        TRL DPOTrainer(precompute_ref_log_probs=True, peft_config=LoraConfig(r=16, all-linear))

Peak RSS is each process's own high-water mark (VmHWM; model load, data, optimizer state, activations);
the table shows the largest over the processes; on CUDA also each process's peak of allocated
GPU memory (`torch.cuda.max_memory_allocated`). Every variant runs with glibc's mmap threshold
fixed (`MALLOC_MMAP_THRESHOLD_=131072`): by default glibc raises the threshold after large frees,
so the buffers FSDP gathers and frees layer by layer are then served from the heap and never
returned, and RSS measures the allocator instead of the training state (FSDP2 measured above
DDP that way; with the threshold fixed, 0.57× on a 110M model). Tokens/s: real tokens of steps 2..N over their
time, summed over processes, as in bench_train. Each variant is its own torchrun job.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_precompute import (  # noqa: E402
    add_child_arguments,
    prepare,
    trl_placeholder,
    trl_step_window,
    trl_token_ids,
    trl_trainer,
)
from benchmarks.process_memory import peak_rss_mib, rss_mib  # noqa: E402

VARIANTS = ("ours-ddp", "ours-fsdp", "ours-lora", "trl-precompute", "trl-lora")
BATCH_SIZE = 2
LORA_R = 16
LEARNING_RATE = 1e-6
MODEL_SIZES = {  # ~100M and ~15M parameters with the 4,096-token vocabulary of `prepare`
    "full": dict(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12, intermediate_size=2560),
    "quick": dict(hidden_size=384, num_layers=6, num_heads=6, num_kv_heads=6, intermediate_size=1024),
    # ~310M: where the fixed per-process cost (imports, mapped shards) weighs less against 16 bytes/parameter
    "large": dict(hidden_size=1024, num_layers=24, num_heads=16, num_kv_heads=16, intermediate_size=2816),
}


def prepare_model(work: Path, rows: int, max_length: int, size: str) -> tuple[Path, Path]:
    """The rows and tokenizer of bench_precompute, a larger model over them, and its reference log-probs."""
    from train.reference import PrecomputeRefConfig, precompute_ref
    from train.tiny import build_model

    small, shards = prepare(work, rows, max_length)
    model = build_model(small, work / "model-large", max_positions=max_length, **MODEL_SIZES[size])
    precompute_ref(PrecomputeRefConfig(shards=str(shards), model=str(model), device="cpu", dtype="float32"))
    save_trl_datasets(shards)
    return model, shards


def save_trl_datasets(shards: Path) -> None:
    """TRL's inputs as files beside the shards (the shard globs ignore them): an in-memory dataset's
    map cache goes to a temporary folder of the process that made it, which TRL's other processes
    under torchrun then fail to open."""
    from datasets import Dataset

    trl_placeholder().save_to_disk(shards / "trl-placeholder")
    Dataset.from_dict(trl_token_ids(shards)).save_to_disk(shards / "trl-rows")


# ---------------------------------------------------------------------------------------------
# One variant, in each process of a torchrun job


def _ours(variant: str, model: Path, shards: Path, steps: int, out: Path, checkpointing: bool) -> float | None:
    from train.config import TrainConfig
    from train.loop import train

    options = {"ours-ddp": {}, "ours-fsdp": {"parallelism": "fsdp"}, "ours-lora": {"lora_r": LORA_R, "lora_alpha": 2 * LORA_R}}
    config = TrainConfig(shards=str(shards), model=str(model), out=str(out), batch_size=BATCH_SIZE, max_steps=steps,
                         log_every=1, learning_rate=LEARNING_RATE, device="auto", dtype="float32",
                         gradient_checkpointing=checkpointing, **options[variant])
    train(config)
    if os.environ.get("RANK", "0") != "0":
        return None
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "tokens_per_s" in r and r["step"] > 1]
    return sum(r["tokens"] for r in timed) / sum(r["tokens"] / r["tokens_per_s"] for r in timed)


def _trl(variant: str, model: Path, shards: Path, steps: int, out: Path, checkpointing: bool) -> float | None:
    from datasets import Dataset
    from trl import DPOConfig

    args = DPOConfig(output_dir=str(out), precompute_ref_log_probs=True, per_device_train_batch_size=BATCH_SIZE,
                     max_steps=steps, learning_rate=LEARNING_RATE, bf16=False, use_cpu=not _cuda(), report_to="none",
                     disable_tqdm=True, save_strategy="no", logging_steps=steps, gradient_checkpointing=checkpointing)
    peft_config = None
    if variant == "trl-lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, target_modules="all-linear", task_type="CAUSAL_LM")
    # Datasets the parent saved (`save_trl_datasets`): every process opens the same files, so TRL's
    # map caches, which rank 0 writes first and the others read, sit beside them.
    trainer = trl_trainer(model, args, peft_config=peft_config, placeholder=Dataset.load_from_disk(shards / "trl-placeholder"))
    trainer.train_dataset = trainer._precompute_ref_logps(Dataset.load_from_disk(shards / "trl-rows"), "train", BATCH_SIZE)
    window = trl_step_window(trainer, steps)
    trainer.train()
    # TRL counts tokens over all processes (its counter is gathered), so rank 0's figure is the job's.
    return window.tokens_per_s if os.environ.get("RANK", "0") == "0" else None


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_child(variant: str, model: Path, shards: Path, steps: int, out: Path, checkpointing: bool) -> None:
    """Peak RSS, and the RSS after the imports each side needs (python, torch, transformers, and
    TRL or our trainer): what the run adds above it is the model, optimizer state and activations."""
    # The same imports on both sides before the baseline is read (trl alone imports torch lazily).
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401
    if variant.startswith("ours"):
        import train.loop  # noqa: F401
        run = _ours
    else:
        from trl import DPOTrainer  # noqa: F401
        run = _trl
    baseline = rss_mib()
    tokens_per_s = run(variant, model, shards, steps, out / "run", checkpointing)
    rank = int(os.environ.get("RANK", "0"))
    result = {"peak_rss_mib": peak_rss_mib(), "tokens_per_s": tokens_per_s,
              "baseline_rss_mib": baseline,
              "peak_device_mib": torch.cuda.max_memory_allocated() / 2**20 if _cuda() else None}
    (out / f"rank-{rank}.json").write_text(json.dumps(result))


def run_variant(variant: str, model: Path, shards: Path, steps: int, procs: int, work: Path, port: int,
                checkpointing: bool) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"{variant}-", dir=work))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", str(port),
               __file__, "--child", variant, "--model", str(model), "--shards", str(shards), "--steps", str(steps),
               "--out", str(out), *([] if checkpointing else ["--no-gradient-checkpointing"])]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    if done.returncode:
        raise RuntimeError(f"{variant} failed:\n{done.stderr[-3000:]}")
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(procs)]
    return {"peak_rss_mib": max(r["peak_rss_mib"] for r in ranks), "tokens_per_s": ranks[0]["tokens_per_s"],
            "above_baseline_mib": max(r["peak_rss_mib"] - r["baseline_rss_mib"] for r in ranks),
            "rss_per_rank_mib": [r["peak_rss_mib"] for r in ranks], "baseline_rss_mib": [r["baseline_rss_mib"] for r in ranks],
            "peak_device_mib": max((r["peak_device_mib"] or 0) for r in ranks) if _cuda() else None}


def compare(model: Path, shards: Path, steps: int, procs: int, work: Path, checkpointing: bool,
            variants: tuple[str, ...] = VARIANTS) -> dict[str, dict]:
    results = {}
    for i, variant in enumerate(variants):
        results[variant] = run_variant(variant, model, shards, steps, procs, work, 29650 + i, checkpointing)
        print(f"{variant}: {results[variant]}", file=sys.stderr)
    return results


def parameters(model: Path) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model).parameters())


def rows(results: dict[str, dict]) -> list[dict]:
    """The issue's targets: FSDP2 ≤ 0.6× DDP; LoRA ≤ 0.5× full fine-tuning; each ≤ TRL's same mode.
    Each on the whole peak RSS and on the part above the imports' RSS."""
    checks = [("FSDP2 / DDP", "ours-fsdp", "ours-ddp", "≤ 0.6"), ("LoRA / DDP", "ours-lora", "ours-ddp", "≤ 0.5"),
              ("ours DDP / TRL precompute", "ours-ddp", "trl-precompute", "≤ 1"),
              ("ours LoRA / TRL LoRA", "ours-lora", "trl-lora", "≤ 1")]
    # On a GPU the training state is in GPU memory; host memory there is the CUDA context and
    # load-time copies (FSDP's rank 0 holds the whole model on the CPU), so the checks read the GPU's.
    if _cuda():
        return [{"check": name, "value": results[a]["peak_device_mib"] / results[b]["peak_device_mib"],
                 "above_baseline": float("nan"), "target": target}
                for name, a, b, target in checks if a in results and b in results]
    return [{"check": name, "value": results[a]["peak_rss_mib"] / results[b]["peak_rss_mib"],
             "above_baseline": results[a]["above_baseline_mib"] / results[b]["above_baseline_mib"], "target": target}
            for name, a, b, target in checks if a in results and b in results]


def markdown(report: dict) -> str:
    where = "NCCL + gloo, one GPU each" if _cuda() else "gloo, CPU"
    lines = [f"{report['procs']} processes ({where}), Llama {report['parameters'] / 1e6:.0f}M parameters from a config, "
             f"{report['steps']} steps of {BATCH_SIZE} pairs per process, float32, activation checkpointing "
             f"{'on' if report['gradient_checkpointing'] else 'off'} for every variant.", "",
             "| variant | peak RSS per process (MiB, max over processes) | of which above the imports | peak GPU MiB | "
             "tokens/s (all processes) |", "|---|---|---|---|---|"]
    for variant, result in report["results"].items():
        device = f"{result['peak_device_mib']:,.0f}" if result.get("peak_device_mib") else "—"
        lines.append(f"| {variant} | {result['peak_rss_mib']:,.0f} | {result['above_baseline_mib']:,.0f} | {device} | "
                     f"{result['tokens_per_s']:,.0f} |")
    measure = "peak GPU memory ratio" if _cuda() else "peak RSS ratio"
    lines += ["", f"| {measure} | whole process | above the imports | target |", "|---|---|---|---|"]
    lines += [f"| {r['check']} | {r['value']:.2f} | {r['above_baseline']:.2f} | {r['target']} |" for r in report["rows"]]
    return "\n".join(lines) + "\n"


def run(quick: bool, procs: int, steps: int, work: Path, checkpointing: bool = True, size: str | None = None,
        variants: tuple[str, ...] = VARIANTS) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    model, shards = prepare_model(work, rows=100 if quick else 200, max_length=512, size=size or ("quick" if quick else "full"))
    results = compare(model, shards, steps, procs, work, checkpointing, variants)
    return {"procs": procs, "steps": steps, "parameters": parameters(model), "gradient_checkpointing": checkpointing,
            "results": results, "rows": rows(results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a ~15M-parameter model: a smoke test, not figures to quote")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps; step 1 is not timed")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--size", choices=sorted(MODEL_SIZES), help="model size (default: full, or quick with --quick)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    add_child_arguments(parser, VARIANTS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child, args.model, args.shards, args.steps, args.out, args.gradient_checkpointing)
        return
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        report = run(args.quick, args.procs, args.steps, Path(tmp), args.gradient_checkpointing, args.size, tuple(args.variants))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(markdown(report))


if __name__ == "__main__":
    main()
