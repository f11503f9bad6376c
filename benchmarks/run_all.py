"""Every stage's benchmark beside its peer, one table (issue 9): `make bench` / `make bench-quick`.

    .venv/bin/python benchmarks/run_all.py [--quick] [--out DIR] [--sections A,B]

The table is written after each section (data, engine, tokenize, model-uniform, model-hh,
reward-uniform, reward-hh, generate, neardup, memory), so a stopped run keeps what it measured;
`--sections` runs some of them into the table already in --out (the same sizes, machine and
software only), or into a new table in another --out.

Rows (ours | peer):
    ingest          prefdata ingest | datasets load_dataset("json") + map splitting the HH transcripts into
                    messages, worker processes = cores on both sides (bench_ingest.py)
    curate          prefdata curate (exact + near dedupe + split) on uniform random prompts and on real chat
                    prompts resampled with edits (bench_curate.py); no peer does the same work
    engine          ingest and curate with --engine ray | --engine local on the same inputs, this machine,
                    10M records (the Ray engine's overhead; docs/cluster.md projects N nodes) (bench_engine.py)
    tokenize        prefdata tokenize | datasets map(batched=True), same tokenizer and chat template, one
                    process and num_proc = cores; both timed as whole processes
    precompute-ref  prefdata precompute-ref | TRL DPOTrainer._precompute_ref_logps
    train           our trainer, precomputed and live reference, and with gradient checkpointing (TRL's
                    default) | TRL DPOTrainer, live and precompute
    train reward    --objective reward (prefix-shared rows) | TRL RewardTrainer (two padded rows per pair),
                    same model, rows, batch, float32, no checkpointing either side (bench_reward.py), beside
                    the FLOP bound of the two layouts (bench_bounds.py, objective reward)
    train KTO       --objective kto on the same dump rows ingested --unpaired | TRL KTOTrainer with precomputed
                    references on the same ids and KL completions, rows/s (bench_kto.py), beside the FLOP bound
    MFU             model FLOPs of the real tokens (6·params per token, the same count for ours and TRL)
                    per second ÷ this machine's dense float32 matmul FLOP/s, measured in this run; and
                    ours over the tokens it computes (a shared prompt once)
    near-dup        curate's near-duplicate rule | datasketch, rensa on the same comparison text, threshold
                    and LSH layout, on the labelled set of tests/test_neardup.py and on reader-labelled
                    pairs (tests/fixtures/neardup/reviewed_pairs.jsonl): precision, recall, seconds
    memory          peak RSS per process of DDP, FSDP2, LoRA | TRL DPOTrainer precompute, with
                    peft_config; ~100M-parameter Llama, 2 processes (bench_memory.py)
    generate        prefdata generate | a plain model.generate loop, one prompt per call and batched,
                    same stop tokens and the same work timed; judge in responses/s with a reward model
                    and with a function (bench_generate.py)
Each measured command is its own subprocess (peak RSS summed over its process tree); ours and the
peer alternate; figures are medians over the repetitions. Writes bench.json and bench.md in --out (benchmarks/results/).
TRL and psutil come from the optional `.[bench]` extra.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Generated tables live apart from the code that makes them (docs/benchmarks.md reads them).
RESULTS = ROOT / "benchmarks" / "results"

from benchmarks import (  # noqa: E402
    bench_bounds,
    bench_curate,
    bench_engine,
    bench_generate,
    bench_ingest,
    bench_kto,
    bench_memory,
    bench_neardup,
    bench_precompute,
    bench_reward,
    bench_train,
)
from schemas.cpus import usable_cpus  # noqa: E402
from schemas.io import write_text_atomic  # noqa: E402

SIZES = {  # quick: `make bench-quick`, under 5 minutes on 2 busy cores
    "full": dict(ingest_rows=1_000_000, curate_rows=1_000_000, curate_realistic_rows=(1_000_000, 10_000_000),
                 tokenize_rows=50_000, model_rows=300, max_length=768, train_steps=None, repeats=3, train_repeats=3,
                 neardup_speed_rows=100_000, engine_rows=bench_engine.FULL_ROWS),  # train_steps None: one epoch
    "quick": dict(ingest_rows=50_000, curate_rows=50_000, curate_realistic_rows=(50_000,), tokenize_rows=20_000,
                  model_rows=80, max_length=384, train_steps=3, repeats=2, train_repeats=1, neardup_speed_rows=20_000,
                  engine_rows=bench_engine.QUICK_ROWS),
}


# ---------------------------------------------------------------------------------------------
# What runs inside a child process (`--child NAME`): each returns a dict of figures.


def peer_tokenize(records: str, tokenizer: str, cache: str, num_proc: int | None = None) -> dict:
    """datasets.map(batched=True): chat-template the prompt and each conversation, encode the prompt
    and the two completions (the text after the prompt), as tokenize does. Timed as a whole process,
    like `prefdata tokenize` beside it: imports and the tokenizer load count for both."""
    import pyarrow.compute as pc
    from datasets import Dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)

    def encode(batch: dict) -> dict:
        prompts = tok.apply_chat_template(batch["prompt"], add_generation_prompt=True, tokenize=False)
        out = {"prompt_input_ids": tok(prompts, add_special_tokens=False)["input_ids"]}
        for side in ("chosen", "rejected"):
            full = tok.apply_chat_template([p + a for p, a in zip(batch["prompt"], batch[side])], tokenize=False)
            out[f"{side}_input_ids"] = tok([f[len(p):] for f, p in zip(full, prompts)], add_special_tokens=False)["input_ids"]
        return out

    data = Dataset.from_parquet(records, cache_dir=tempfile.mkdtemp(dir=cache), columns=["prompt", "chosen", "rejected"])
    data = data.map(encode, batched=True, num_proc=num_proc, remove_columns=["prompt", "chosen", "rejected"])
    return {"tokens": sum(pc.sum(pc.list_value_length(data.data.column(c))).as_py() for c in data.column_names)}


def ours_precompute(model: str, pristine: str, shards: str) -> dict:
    shutil.rmtree(shards, ignore_errors=True)
    shutil.copytree(pristine, shards)
    return bench_precompute.run_ours(Path(model), Path(shards), batch_tokens=4096)


def trl_precompute(model: str, pristine: str, work: str) -> dict:
    result = bench_precompute.run_trl(Path(model), Path(pristine), Path(work))
    return {k: v for k, v in result.items() if k != "ref_chosen_logps"}


CHILDREN = {"peer_tokenize": peer_tokenize,
            "ours_precompute": ours_precompute, "trl_precompute": trl_precompute}


# ---------------------------------------------------------------------------------------------
# The parent: subprocesses, alternation, medians.


def measure(command: list[str]) -> dict:
    """Wall seconds and peak RSS (MiB, whole process tree) of a command; its JSON result if it wrote one."""
    measured = bench_ingest.run_measured(command)
    result = json.loads(Path(command[-1]).read_text()) if "--result" in command else {}
    return {"seconds": measured.seconds, "peak_rss_mib": measured.peak_rss / 2**20, **result}


def child(name: str, results: Path, **kwargs: object) -> list[str]:
    """The command that runs CHILDREN[name](**kwargs) in a fresh process; its figures go to a file in
    `results` (a `seconds` among them replaces the process's wall time: the work, not the start-up)."""
    result = results / f"{name}.result.json"
    return [sys.executable, __file__, "--child", name, "--kwargs", json.dumps(kwargs), "--result", str(result)]


def alternate(commands: dict[str, list[str]], repeats: int) -> dict[str, dict]:
    """Run each command `repeats` times, in turn; the median of every numeric figure per command."""
    runs: dict[str, list[dict]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, command in commands.items():
            runs[name].append(measure(command))
    return {name: {key: statistics.median(r[key] for r in results) for key in results[0] if isinstance(results[0][key], (int, float))}
            for name, results in runs.items()}


def matmul_flops(repeats: int = 10) -> float:
    """Dense float32 matmul FLOP/s where the model stages run (torch's CPU threads, or the GPU):
    best of `repeats` n×n products, n large enough to fill the device."""
    import torch

    device = bench_precompute.bench_device()
    size = 1024 if device == "cpu" else 8192
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)

    def product() -> None:
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()

    product()  # warm-up
    best = min(_timed(product) for _ in range(repeats))
    return 2 * size**3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def row(stage: str, metric: str, ours: float, peer: float | None, peer_name: str, target: str, higher_is_better: bool = True) -> dict:
    ratio = None if not peer else (ours / peer if higher_is_better else peer / ours)
    return {"stage": stage, "metric": metric, "ours": ours, "peer": peer, "peer_name": peer_name, "ratio": ratio, "target": target}


@dataclass
class Bench:
    """What every section of one run shares: the sizes, a scratch directory, and the things more
    than one section needs (built once, on first use, so any section can run alone)."""

    size: str
    work: Path

    @property
    def sizes(self) -> dict:
        return SIZES[self.size]

    @cached_property
    def cores(self) -> int:
        return usable_cpus()  # ours defaults to one worker per usable CPU: the peers get as many

    @cached_property
    def raw(self) -> Path:
        raw = self.work / "hh.jsonl"
        bench_ingest.write_rows(raw, self.sizes["ingest_rows"])
        (self.work / "hf-cache").mkdir()
        return raw

    @cached_property
    def ingested(self) -> Path:
        """The HH records ingest wrote: the data section's timed runs leave them; alone, one untimed run."""
        out = self.work / "ingest"
        if not (out / "records.parquet").exists():
            subprocess.run(bench_ingest.commands(self.raw, out, self.work / "hf-cache", self.cores)["ours"], check=True)
        return out

    @cached_property
    def model(self) -> Path:
        return bench_precompute.prepare(self.work / "model-work", self.sizes["model_rows"], self.sizes["max_length"])[0]

    @cached_property
    def flops(self) -> float:
        return matmul_flops()


def data_section(bench: Bench) -> dict:
    sizes, repeats = bench.sizes, bench.sizes["repeats"]
    ingest = alternate(bench_ingest.commands(bench.raw, bench.work / "ingest", bench.work / "hf-cache", bench.cores), repeats)
    n, peer = sizes["ingest_rows"], f"datasets json+map(num_proc={bench.cores})"
    rows = [row("ingest", "rows/s", n / ingest["ours"]["seconds"], n / ingest["peer"]["seconds"], peer, "≥ 1× the peer"),
            row("ingest", "peak RSS MiB", ingest["ours"]["peak_rss_mib"], ingest["peer"]["peak_rss_mib"], peer, "< 1 GiB", False)]
    bench_curate.generate(bench.work / "records", sizes["curate_rows"])
    curate = alternate({"ours": [sys.executable, bench_curate.__file__, "--child", str(bench.work / "records")]}, repeats)["ours"]
    n = sizes["curate_rows"]
    rows += [row("curate [uniform random prompts]", "records/s", n / curate["seconds"], None, "—", "1M records < 120 s"),
             row("curate [uniform random prompts]", "peak RSS MiB", curate["peak_rss_mib"], None, "—", "< 4 GiB", False)]
    return {"rows": rows + curate_realistic(bench.work, sizes["curate_realistic_rows"], repeats)}


def engine_section(bench: Bench) -> dict:
    # Ten million records run once per engine, as curate_realistic's: each run takes many minutes here.
    engine_rows = bench.sizes["engine_rows"]
    work = bench.work / "engine"
    rows = bench_engine.rows(bench_engine.run(engine_rows, work, bench.sizes["repeats"] if engine_rows <= 1_000_000 else 1), row)
    shutil.rmtree(work)
    return {"rows": rows}


def tokenize_section(bench: Bench) -> dict:
    work, model, cores = bench.work, bench.model, bench.cores
    tokenize_input = _tokenize_input(bench.ingested, work / "tokenize-input", bench.sizes["tokenize_rows"])
    records = str(tokenize_input / "records.parquet")
    tokenize = alternate({
        "ours": [sys.executable, "-m", "prefdata", "tokenize", str(tokenize_input), "--tokenizer", str(model),
                 "--out", str(work / "tok-out"), "--max-length", "4096", "--max-prompt-length", "2048"],
        "peer": child("peer_tokenize", work, records=records, tokenizer=str(model), cache=str(work / "hf-cache")),
        # Ours uses one process per usable CPU by default; the peer given as many.
        "peer-procs": child("peer_tokenize", work, records=records, tokenizer=str(model), cache=str(work / "hf-cache"),
                            num_proc=cores),
    }, bench.sizes["repeats"])
    stats = json.loads((work / "tok-out" / "manifest.json").read_text())["stats"]
    ours_tps = (stats["prompt_tokens"] + stats["completion_tokens"]) / tokenize["ours"]["seconds"]
    return {"rows": [row("tokenize", "tokens/s", ours_tps, tokenize[peer]["tokens"] / tokenize[peer]["seconds"], name,
                         "faster than the peer")
                     for peer, name in (("peer", "datasets map(batched)"), ("peer-procs", f"datasets map(batched, num_proc={cores})"))]}


def model_section(rows_set: str) -> Callable[[Bench], dict]:
    def section(bench: Bench) -> dict:
        rows, train_runs = model_stages(bench.work / f"model-{rows_set}", rows_set, bench.sizes, bench.sizes["repeats"], bench.flops)
        return {"rows": rows, "train_runs": train_runs, "matmul_gflops": bench.flops / 1e9,
                "model_parameters": _parameters(bench.work / f"model-{rows_set}" / "model")}
    return section


def reward_section(rows_set: str) -> Callable[[Bench], dict]:
    """The reward model on the model section's rows and model (prepared afresh, so it runs alone):
    ours --objective reward beside TRL's RewardTrainer, and the FLOP bound of the two layouts."""
    def section(bench: Bench) -> dict:
        sizes = bench.sizes
        model, shards = bench_precompute.prepare(bench.work / f"reward-{rows_set}", sizes["model_rows"], sizes["max_length"],
                                                 bench_precompute.DUMPS[rows_set])
        runs = bench_reward.compare(model, shards, sizes["train_steps"] or bench_train.epoch_steps(shards), sizes["train_repeats"],
                                    bench.work / f"reward-{rows_set}")
        limits = bench_bounds.shard_bounds(shards, model, objective="reward")
        return {"rows": bench_reward.table_rows(rows_set, runs, limits, row), "train_runs": runs, "model_parameters": _parameters(model)}
    return section


def generate_section(bench: Bench) -> dict:
    generated = bench_generate.run(quick=bench.size == "quick", work=bench.work / "generate")
    return {"rows": [*(row("generate", "tokens/s", generated["ours"]["tokens_per_s"], generated[name]["tokens_per_s"], peer,
                           "faster than the loop") for name, peer in bench_generate.PEERS.items()),
                     *(row(f"judge ({name})", "responses/s", rate, None, "—", "—")
                       for name, rate in generated["judge_responses_per_s"].items())]}


def neardup_section(bench: Bench) -> dict:
    return {"rows": [], "neardup": bench_neardup.run(speed_rows=bench.sizes["neardup_speed_rows"])}


def memory_section(bench: Bench) -> dict:
    return {"rows": [], "memory": bench_memory.run(quick=bench.size == "quick", procs=2, steps=3, work=bench.work / "memory")}


# In table order; `--sections` runs some of them, in the order given, into the table already in --out.
SECTIONS: dict[str, Callable[[Bench], dict]] = {
    "data": data_section, "engine": engine_section, "tokenize": tokenize_section,
    "model-uniform": model_section("uniform"), "model-hh": model_section("hh"),
    "reward-uniform": reward_section("uniform"), "reward-hh": reward_section("hh"),
    "generate": generate_section, "neardup": neardup_section, "memory": memory_section,
}


def run(size: str, work: Path, sections: list[str], report: dict, write: Callable[[dict], None]) -> dict:
    """Run `sections` into `report`, writing it after each one: a stopped run keeps what it measured."""
    bench = Bench(size, work)
    commit = _commit()  # the code as the run starts (what the children import)
    for name in sections:
        started = time.time()
        load = os.getloadavg()[0]
        result = SECTIONS[name](bench)
        report["sections"][name] = {**result, "started": _iso(started), "seconds": time.time() - started,
                                    "load_average_at_start": load, "commit": commit}
        write(report)
    return report


def new_report(size: str) -> dict:
    # Through JSON as bench.json holds them (tuples become lists), so a resumed table's compare.
    return {"size": size, "sizes": json.loads(json.dumps(SIZES[size])), "machine": machine(), "sections": {}}


def resumed_report(path: Path, size: str) -> dict:
    """The table already in --out, for the sections run now to replace theirs in; a new one where
    there is none. One table is one machine: a table measured at other sizes, on another machine or
    with other software is never extended, nor overwritten by part of a run (SystemExit)."""
    fresh = new_report(size)
    if not path.exists():
        return fresh
    old = json.loads(path.read_text())
    if "sections" not in old:
        raise SystemExit(f"{path}: a table from before sections; run the whole bench (no --sections) for a new one")
    differs = [key for key in ("size", "sizes", "machine") if old[key] != fresh[key]]
    if differs:
        raise SystemExit(f"{path}: its {', '.join(differs)} differ from this run's; run the whole bench (no --sections) "
                         "for a new table, or give another --out")
    return old


def _commit() -> str | None:
    """The code measured: the repository's commit, with `+changes` where the tree differs from it
    (the tables the bench itself rewrites aside)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD")
    changed = commit and git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results")
    return f"{commit}+changes" if changed else (commit or None)


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(seconds))


def curate_realistic(work: Path, sizes: tuple[int, ...], repeats: int) -> list[dict]:
    """Curate on real chat prompts resampled with edits (bench_curate.generate_realistic), at each
    size; a size above a million runs once (ten million records take ~10 minutes a run here)."""
    pool = bench_curate.real_pool(work)
    rows = []
    for n in sizes:
        records = work / f"records-realistic-{n}"
        bench_curate.generate_realistic(records, n, pool)
        command = [sys.executable, bench_curate.__file__, "--child", str(records)]
        curate = alternate({"ours": command}, repeats if n <= 1_000_000 else 1)["ours"]
        shutil.rmtree(records)  # ten million records are gigabytes of parquet
        stage = f"curate [real chat prompts, {n:,} records]"
        rows += [row(stage, "records/s", n / curate["seconds"], None, "—", "—"),
                 row(stage, "peak RSS MiB", curate["peak_rss_mib"], None, "—", "< 6 GiB at 10M", False)]
    return rows


def model_stages(work: Path, rows_set: str, sizes: dict, repeats: int, flops: float) -> tuple[list[dict], dict]:
    """precompute-ref and train beside TRL on one row set (bench_precompute.DUMPS): `uniform`
    (dpo_en_demo: long answers) or `hh` (HH-RLHF multi-turn: long prompts, short answers)."""
    model, shards = bench_precompute.prepare(work, sizes["model_rows"], sizes["max_length"], bench_precompute.DUMPS[rows_set])
    pristine = work / "shards-tokenized"
    shutil.copytree(shards, pristine)
    precompute = alternate({
        "ours": child("ours_precompute", work, model=str(model), pristine=str(pristine), shards=str(shards)),
        "peer": child("trl_precompute", work, model=str(model), pristine=str(pristine), work=str(work)),
    }, repeats)
    trl_tps = precompute["peer"]["tokens"] / precompute["peer"]["seconds"]
    stage = f"precompute-ref [{rows_set}]"
    # TRL's figure times its scoring call alone (model loaded, no files): ours' scoring loop is its
    # like; the whole stage and its fixed cost (imports, fingerprints, model load, writes) beside it.
    rows = [row(stage, "tokens/s, scoring", precompute["ours"]["compute_tokens_per_s"], trl_tps,
                "TRL precompute_ref_log_probs", "≥ 1.3× uniform, ≥ 3× hh"),
            row(stage, "tokens/s, ours whole stage", precompute["ours"]["tokens"] / precompute["ours"]["seconds"],
                trl_tps, "TRL precompute_ref_log_probs", "—"),
            row(stage, "seconds, ours fixed cost", precompute["ours"]["seconds"]
                - precompute["ours"]["tokens"] / precompute["ours"]["compute_tokens_per_s"], None, "—", "—", False),
            row(stage, "padding efficiency", precompute["ours"]["padding_efficiency"],
                precompute["peer"]["padding_efficiency"], "TRL precompute_ref_log_probs", "—")]
    train = bench_train.compare(model, shards, sizes["train_steps"] or bench_train.epoch_steps(shards), sizes["train_repeats"], work)
    tps = {variant: result["tokens_per_s"] for variant, result in train.items()}
    stage = f"train [{rows_set}]"
    targets = {"uniform": ("≥ 1.8×", "≥ 2.4×"), "hh": ("≥ 4.5×", "—")}[rows_set]
    rows += [row(f"{stage}, no checkpointing either side", "tokens/s", tps["ours"], tps["trl-precompute"], "TRL precompute", targets[0]),
             row(f"{stage}, no checkpointing either side", "tokens/s", tps["ours"], tps["trl-live"], "TRL live", targets[1]),
             row(f"{stage}, checkpointing both sides", "tokens/s", tps["ours-ckpt"], tps["trl-precompute-ckpt"], "TRL precompute", "—"),
             row(f"{stage}, checkpointing both sides", "peak RSS MiB", train["ours-ckpt"]["peak_rss_mib"],
                 train["trl-precompute-ckpt"]["peak_rss_mib"], "TRL precompute", "≤ TRL precompute", False),
             row(f"{stage}, --reference live, no checkpointing", "tokens/s", tps["ours-live"], tps["trl-live"], "TRL live", "—"),
             row(f"{stage}, prefix sharing on ÷ off", "tokens/s", tps["ours"], tps["ours-unshared"], "ours, --prefix-sharing off", "—"),
             row(f"{stage}, --packing (dense block mask) ÷ padded rows", "tokens/s", tps["ours-packed"], tps["ours"],
                 "ours, prefix-shared padded rows", "—")]
    # What sharing, padding and scoring only the answers can buy at most on this epoch (bench_bounds.py):
    # each ratio TRL ÷ ours, to read the measured ones against.
    limits = bench_bounds.shard_bounds(shards, model)
    rows += [row(stage, "bound: tokens, prompt twice ÷ prompt once (sharing)", limits.shared_tokens, limits.real_tokens,
                 "ours, --prefix-sharing off", "—", False),
             row(stage, "bound: processed tokens incl. padding, one epoch", limits.padded_tokens_ours,
                 limits.padded_tokens_trl, "TRL precompute", "—", False),
             row(stage, "bound: training GFLOPs, one epoch", limits.flops_ours / 1e9, limits.flops_trl / 1e9,
                 "TRL precompute", "—", False)]
    rows += mfu_rows(stage, _parameters(model), flops, train)
    # KTO on the same dump rows ingested --unpaired: ours beside TRL's KTOTrainer, stored references both sides.
    kto_shards = bench_kto.unpaired_shards(work, model, sizes["model_rows"], sizes["max_length"], bench_precompute.DUMPS[rows_set])
    kto = bench_kto.compare(model, kto_shards, sizes["train_steps"] or bench_train.epoch_steps(kto_shards), sizes["train_repeats"], work)
    rows += bench_kto.table_rows(rows_set, kto, bench_bounds.shard_bounds(kto_shards, model, objective="kto"), row)
    return rows, {**train, **kto}


def mfu_rows(stage: str, params: int, matmul_flops: float, train: dict[str, dict]) -> list[dict]:
    """Model FLOPs utilisation of training: 6·params FLOPs per token (forward 2, backward 4) over the
    dense matmul FLOP/s measured in the same run. One definition on both sides, the model FLOPs of
    the real tokens (prompt twice + both answers), so the MFU ratio is the tokens/s ratio; TRL's
    padding and full-vocabulary head are work it does, not model FLOPs of its tokens. What ours
    computes (a shared prompt once) is a second row."""
    def mfu(tokens_per_s: float) -> float:
        return 6 * params * tokens_per_s / matmul_flops

    return [row(stage, "MFU, model FLOPs of the real tokens (6·params each)", mfu(train["ours"]["tokens_per_s"]),
                mfu(train["trl-precompute"]["tokens_per_s"]), "TRL precompute", "—"),
            row(stage, "MFU of the tokens ours computes (shared prompt once)", mfu(train["ours"]["computed_tokens_per_s"]),
                None, "—", "—")]


def _tokenize_input(ingested: Path, out: Path, rows: int) -> Path:
    """The first `rows` HH records that ingest wrote (a record set tokenize reads)."""
    import pyarrow.parquet as pq

    from schemas.manifest import Counts, Manifest

    out.mkdir()
    table = pq.read_table(ingested / "records.parquet").slice(0, rows)
    pq.write_table(table, out / "records.parquet")
    Manifest(stage="ingest", package_version="bench", config={}, counts=Counts(read=len(table), kept=len(table))).write(out)
    return out


def _parameters(model: Path) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model).parameters())


def machine() -> dict:
    import torch
    import transformers
    import trl

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}


def markdown(report: dict) -> str:
    m, sections = report["machine"], report["sections"]
    # A section measured inside another's run (a table from before it had one of its own) says so.
    measured = [f"{name} ({s['started']}, {s['seconds'] / 60:.0f} min, load average {s['load_average_at_start']:.1f} at its start, "
                f"commit {s.get('commit')}" + (f"; measured within {s['part_of']}'s run" if "part_of" in s else "") + ")"
                for name, s in sections.items()]
    missing = [name for name in SECTIONS if name not in sections]
    matmul = next((s["matmul_gflops"] for s in sections.values() if "matmul_gflops" in s), None)
    parameters = next((s["model_parameters"] for s in sections.values() if "model_parameters" in s), None)
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads); torch {m['torch']}, transformers "
             f"{m['transformers']}, TRL {m['trl']}; model stages on device: {m['device']}."
             + (f" Dense float32 matmul there: {matmul:.1f} GFLOP/s;" if matmul else "")
             + (f" model {parameters / 1e6:.2f}M parameters." if parameters else ""),
             f"`{report['size']}` sizes: {report['sizes']}.", "",
             f"Sections measured: {'; '.join(measured) or 'none'}." + (f" Not measured: {', '.join(missing)}." if missing else ""), "",
             "| stage | metric | ours | peer | peer value | ours/peer | target |", "|---|---|---|---|---|---|---|"]
    for name in SECTIONS:
        for r in sections.get(name, {}).get("rows", []):
            ours, peer = (_fmt(r["ours"], r["metric"]), "—" if r["peer"] is None else _fmt(r["peer"], r["metric"]))
            ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}×"
            lines.append(f"| {r['stage']} | {r['metric']} | {ours} | {r['peer_name']} | {peer} | {ratio} | {r['target']} |")
    lines += ["", "Ratios are ours ÷ peer for rates and peer ÷ ours for memory (above 1 is better for us)."]
    if "neardup" in sections:
        lines += ["", "Near-duplicate prompts (the generated labelled set of tests/test_neardup.py; reader-labelled pairs):", "",
                  bench_neardup.markdown(sections["neardup"]["neardup"])]
    if "memory" in sections:
        lines += ["", "Training memory at model scale (bench_memory.py):", "", bench_memory.markdown(sections["memory"]["memory"])]
    return "\n".join(lines) + "\n"


def _fmt(value: float, metric: str) -> str:
    """A share as a percentage; a figure under 100 (KTO's rows/s, a fixed cost in seconds) to three
    significant digits, where a whole number would hide the ratio beside it; larger ones whole."""
    if metric.startswith(("MFU", "padding efficiency")):
        return f"{value:.1%}"
    return f"{value:#.3g}" if abs(value) < 100 else f"{value:,.0f}"


def _section_names(text: str) -> list[str]:
    names = text.split(",")
    if unknown := [name for name in names if name not in SECTIONS]:
        raise argparse.ArgumentTypeError(f"no section {', '.join(unknown)}; the sections are {', '.join(SECTIONS)}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, under 5 minutes")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--sections", type=_section_names, metavar="A,B",
                        help=f"run only these, in this order, into the table in --out (of {', '.join(SECTIONS)})")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--kwargs", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.result.write_text(json.dumps(CHILDREN[args.child](**json.loads(args.kwargs))))
        return
    size = "quick" if args.quick else "full"
    # A GPU run writes its own files, so the CPU and GPU tables never overwrite each other.
    stem = "bench" if bench_precompute.bench_device() == "cpu" else "bench-cuda"
    table = args.out / f"{stem}.json"
    report = resumed_report(table, size) if args.sections else new_report(size)

    def write(report: dict) -> None:
        write_text_atomic(table, json.dumps(report, indent=2))
        write_text_atomic(args.out / f"{stem}.md", markdown(report))

    with tempfile.TemporaryDirectory(prefix="bench-all-") as tmp:
        run(size, Path(tmp), args.sections or list(SECTIONS), report, write)
    print(markdown(report))


if __name__ == "__main__":
    main()
