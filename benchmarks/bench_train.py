"""DPO training throughput and memory: our trainer against TRL 1.x `DPOTrainer` (issue 7).

    .venv/bin/python benchmarks/bench_train.py [--rows 200] [--max-length 768] [--steps N] [--repeats 3]

Same rows, same ~4M-parameter Llama, batch 8 pairs, float32, CPU, sigmoid loss, fused AdamW (our
trainer's, and transformers' default `adamw_torch_fused` for TRL), N optimizer steps:
by default one epoch, so that both sides train on every pair of the train split once.
Activation checkpointing is named in every variant, so each ratio compares like with like:
    ours                 `train()`, stored reference, prefix sharing (default), no checkpointing
    ours-unshared        the same with --prefix-sharing off (what sharing buys)
    ours-packed          the same with --packing: each batch one padding-free row (a dense block mask here)
    ours-live            ours with `--reference live` (the reference model runs every step)
    ours-ckpt            ours with activation checkpointing
    trl-precompute       TRL DPOTrainer(precompute_ref_log_probs=True), no checkpointing
    trl-live             TRL DPOTrainer with a live reference model, no checkpointing
    trl-precompute-ckpt  TRL precompute with checkpointing (DPOConfig's default)
Headlines: ours ÷ trl-precompute and ours ÷ trl-live (both without checkpointing), ours-ckpt ÷
trl-precompute-ckpt (both with). Rows and model come from `bench_precompute.prepare`, on two row
sets (`--rows-set`): `uniform` (LLaMA-Factory's dpo_en_demo, long answers) and `hh` (real
multi-turn HH-RLHF helpful-base rows: long prompts, short answers); TRL trains on exactly our
shards' token ids. Each run is its own subprocess (peak RSS is that process's own high-water mark,
VmHWM, not ru_maxrss, which carries the parent's peak into the child: model loads, data and TRL's
precompute pass included); the variants alternate, and each
figure is the median over --repeats. Tokens/s = real tokens (prompt twice + both answers) of the
batches trained on ÷ the time of training steps 2..N: step 1 (first-call warm-up: optimizer state,
lazy imports) is left out, and so are model loading, our step-0 reference check, TRL's precompute
pass and the final save, for every variant. A window shorter than the epoch would time a sample of
our length-grouped batches, each with its own share of padding and row length (a batch's cost per
token grows with its rows' length): with a fixed seed the same few groups every repeat, a bias
that moved the ratio by over 10% between two orderings of the same rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_precompute import (  # noqa: E402
    DUMPS,
    add_child_arguments,
    bench_device,
    prepare,
    trl_step_window,
    trl_token_ids,
    trl_trainer,
)
from benchmarks.bench_precompute import run_ours as precompute_ours  # noqa: E402
from benchmarks.process_memory import peak_rss_mib  # noqa: E402

VARIANTS = ("ours", "ours-unshared", "ours-packed", "ours-live", "ours-ckpt", "trl-precompute", "trl-live", "trl-precompute-ckpt")
BATCH_SIZE = 8
LEARNING_RATE = 1e-6


def train_ours(model: Path, shards: Path, steps: int, out: Path, live: bool, checkpointing: bool = False,
               sharing: bool = True, packing: bool = False) -> dict:
    """Our trainer, logging every step; steps 2..N of its metrics lines are the timed window."""
    from train.config import TrainConfig
    from train.loop import train

    config = TrainConfig(shards=str(shards), model=str(model), out=str(out), reference="live" if live else "precomputed",
                         batch_size=BATCH_SIZE, max_steps=steps, log_every=1, learning_rate=LEARNING_RATE,
                         gradient_checkpointing=checkpointing, prefix_sharing="auto" if sharing else "off",
                         packing=packing, device=bench_device(), dtype="float32")
    train(config)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "tokens_per_s" in r and r["step"] > 1]
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in timed)
    return {"tokens_per_s": sum(r["tokens"] for r in timed) / seconds,
            "computed_tokens_per_s": sum(r["computed_tokens"] for r in timed) / seconds}


def train_trl(model: Path, shards: Path, steps: int, out: Path, precompute: bool, checkpointing: bool) -> dict:
    """TRL's `train()`, timed by a callback from the end of step 1 to the end of step N, counting
    the real tokens TRL itself counts (attention-mask sums) over those steps."""
    from datasets import Dataset
    from trl import DPOConfig

    args = DPOConfig(output_dir=str(out), precompute_ref_log_probs=precompute, per_device_train_batch_size=BATCH_SIZE,
                     max_steps=steps, learning_rate=LEARNING_RATE, bf16=False, use_cpu=bench_device() == "cpu", report_to="none",
                     disable_tqdm=True, save_strategy="no", logging_steps=steps, gradient_checkpointing=checkpointing)
    trainer = trl_trainer(model, args)
    dataset = Dataset.from_dict(trl_token_ids(shards))
    # What TRL's __init__ does to its train_dataset when precompute_ref_log_probs=True (untimed).
    trainer.train_dataset = trainer._precompute_ref_logps(dataset, "train", BATCH_SIZE) if precompute else dataset
    window = trl_step_window(trainer, steps)
    trainer.train()
    return {"tokens_per_s": window.tokens_per_s}


def run_child(variant: str, model: Path, shards: Path, steps: int, out: Path) -> dict:
    """One variant in this process; adds this process's own peak RSS."""
    checkpointing = variant.endswith("-ckpt")
    if variant.startswith("ours"):
        result = train_ours(model, shards, steps, out, live=variant == "ours-live", checkpointing=checkpointing,
                            sharing=variant != "ours-unshared", packing=variant == "ours-packed")
    else:
        result = train_trl(model, shards, steps, out, precompute=variant.startswith("trl-precompute"), checkpointing=checkpointing)
    return {**result, "peak_rss_mib": peak_rss_mib()}


def run_in_subprocess(variant: str, model: Path, shards: Path, steps: int, work: Path, script: str = __file__) -> dict:
    """`script --child variant` in its own process (its own peak RSS); its last stdout line is the result."""
    out = Path(tempfile.mkdtemp(prefix=f"{variant}-", dir=work))
    command = [sys.executable, script, "--child", variant, "--model", str(model), "--shards", str(shards),
               "--steps", str(steps), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(model: Path, shards: Path, steps: int, repeats: int, work: Path, variants: tuple[str, ...] = VARIANTS,
            script: str = __file__) -> dict[str, dict]:
    """Every variant `repeats` times, alternating (each run by `script`, this file or another
    bench's); per variant the median of each figure and the runs."""
    runs: dict[str, list[dict]] = {variant: [] for variant in variants}
    for repeat in range(repeats):
        for variant in variants:
            runs[variant].append(run_in_subprocess(variant, model, shards, steps, work, script))
            print(f"repeat {repeat + 1}: {variant} {runs[variant][-1]['tokens_per_s']:,.0f} tokens/s", file=sys.stderr)
    return {variant: {key: statistics.median(run[key] for run in results) for key in results[0]} | {"runs": results}
            for variant, results in runs.items()}


def prepare_with_reference(work: Path, rows: int, max_length: int, rows_set: str = "uniform") -> tuple[Path, Path]:
    """bench_precompute's model and shards, with the reference log-probs added by precompute-ref."""
    model, shards = prepare(work, rows, max_length, DUMPS[rows_set])
    precompute_ours(model, shards, batch_tokens=4096)
    return model, shards


def epoch_steps(shards: Path) -> int:
    """Steps of `BATCH_SIZE` rows (pairs, or unpaired rows) in one pass over the train split (the
    last batch may be short)."""
    import polars as pl

    rows = sum(pl.scan_ipc(str(path)).select(pl.len()).collect().item() for path in shards.glob("train-*.arrow"))
    return -(-rows // BATCH_SIZE)


def ratios(results: dict[str, dict]) -> dict[str, float]:
    """Like for like only: without checkpointing on both sides, and with it on both sides."""
    tps = {variant: results[variant]["tokens_per_s"] for variant in VARIANTS}
    return {"vs_trl_precompute": tps["ours"] / tps["trl-precompute"], "vs_trl_live": tps["ours"] / tps["trl-live"],
            "ckpt_vs_trl_precompute_ckpt": tps["ours-ckpt"] / tps["trl-precompute-ckpt"],
            "prefix_sharing_speedup": tps["ours"] / tps["ours-unshared"], "packing_speedup": tps["ours-packed"] / tps["ours"],
            "rss_ckpt_vs_trl_precompute_ckpt": results["ours-ckpt"]["peak_rss_mib"] / results["trl-precompute-ckpt"]["peak_rss_mib"]}


def bench_arguments(doc: str, variants: tuple[str, ...]) -> argparse.Namespace:
    """The command line every ours-beside-TRL training bench takes (and its hidden child flags)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=768)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: one epoch)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows-set", choices=sorted(DUMPS), default="uniform")
    add_child_arguments(parser, variants)
    return parser.parse_args()


def peer_rows(stage: str, rate: str, key: str, ours: dict, peer: dict, peer_name: str, target: str, limits, row) -> list[dict]:
    """A bench table's rows for ours beside one TRL trainer: the rate (`key` of each result),
    peak RSS (target ≤ TRL), and the FLOP bound's own rows (`limits`, a bench_bounds.Bounds)."""
    return [row(stage, rate, ours[key], peer[key], peer_name, target),
            row(stage, "peak RSS MiB", ours["peak_rss_mib"], peer["peak_rss_mib"], peer_name, "≤ TRL", False),
            row(stage, "bound: processed tokens incl. padding, one epoch", limits.padded_tokens_ours, limits.padded_tokens_trl,
                peer_name, "—", False),
            row(stage, "bound: training GFLOPs, one epoch", limits.flops_ours / 1e9, limits.flops_trl / 1e9, peer_name, "—", False)]


def peer_main(doc: str, script: str, variants: tuple[str, str], prepare_rows, run_child, objective: str, key: str,
              unit: str) -> None:
    """The command of an ours-beside-TRL training bench: as a child, one variant; else both,
    alternating, on `prepare_rows(work, rows, max_length, dump)`'s (model, shards), beside the
    FLOP bound of `objective`, printed. `key`: the rate each result holds, in `unit`."""
    from benchmarks.bench_bounds import shard_bounds

    args = bench_arguments(doc, variants)
    if args.child:
        print(json.dumps(run_child(args.child, args.model, args.shards, args.steps, args.out)))
        return
    with tempfile.TemporaryDirectory(prefix=f"bench-{objective}-") as tmp:
        model, shards = prepare_rows(Path(tmp), args.rows, args.max_length, DUMPS[args.rows_set])
        steps = args.steps or epoch_steps(shards)
        results = compare(model, shards, steps, args.repeats, Path(tmp), variants, script)
        limits = shard_bounds(shards, model, objective=objective)
    print(f"{args.rows_set} rows, {steps} steps of {BATCH_SIZE}, float32 {bench_device()}, no checkpointing either side, "
          f"medians of {args.repeats} alternating runs")
    ours, peer = variants
    for variant in variants:
        print(f"{variant:12s} {results[variant][key]:10,.2f} {unit}  peak RSS {results[variant]['peak_rss_mib']:7,.0f} MiB")
    print(f"ours/TRL {results[ours][key] / results[peer][key]:.2f}x; FLOP bound {limits.ratios()['flops']:.2f}x; "
          f"peak RSS TRL/ours {results[peer]['peak_rss_mib'] / results[ours]['peak_rss_mib']:.2f}x")


def main() -> None:
    args = bench_arguments(__doc__, VARIANTS)
    if args.child:
        print(json.dumps(run_child(args.child, args.model, args.shards, args.steps, args.out)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        model, shards = prepare_with_reference(Path(tmp), args.rows, args.max_length, args.rows_set)
        steps = args.steps or epoch_steps(shards)
        results = compare(model, shards, steps, args.repeats, Path(tmp))
    print(f"{steps} steps of {BATCH_SIZE} pairs, float32 CPU, medians of {args.repeats} alternating runs")
    for variant in VARIANTS:
        print(f"{variant:15s} {results[variant]['tokens_per_s']:9,.0f} tokens/s  peak RSS {results[variant]['peak_rss_mib']:7,.0f} MiB")
    print(" ".join(f"{name} {value:.2f}x" for name, value in ratios(results).items()))


if __name__ == "__main__":
    main()
