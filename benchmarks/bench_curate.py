"""Curate N records (exact + near dedupe + split) and report records/s and peak RSS.

    python benchmarks/bench_curate.py [--rows 1000000] [--workdir DIR] [--chunk-rows 200000] [--shuffled]

The record set is generated straight into Arrow (not through pydantic): this measures curate, not
the generator, and is reused from --workdir when it is already there with the same size. 5% of
pairs are exact duplicates and 10% of prompts are near-duplicates (one word changed), so every step
has work to do. Curate runs in a fresh process and reports its own peak RSS (VmHWM: ru_maxrss would carry the
generating parent's peak).
--shuffled writes the records out of (source, source_row) order, so curate's pass 2 goes through its
on-disk bucket sort. Issue 15 target on this 2-core machine: 10M records under 6 GiB, at no less
than 12.8k records/s; memory follows --chunk-rows, not --rows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.process_memory import peak_rss_mib  # noqa: E402
from schemas.manifest import Counts, Manifest  # noqa: E402
from schemas.records import RECORD_SCHEMA  # noqa: E402


def _messages(role: str, texts: list[str]) -> pa.Array:
    return pa.array([[{"role": role, "content": t}] for t in texts], RECORD_SCHEMA.field("prompt").type)


def generate(out: Path, rows: int, seed: int = 0, shuffled: bool = False) -> None:
    rng = np.random.default_rng(seed)
    order = np.random.default_rng(seed + 1).permutation(rows) if shuffled else None
    vocab = np.array([f"w{i}" for i in range(20_000)])
    out.mkdir(parents=True, exist_ok=True)
    writer = pq.ParquetWriter(out / "records.parquet", RECORD_SCHEMA)
    chunk = 100_000
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        words = vocab[rng.integers(0, len(vocab), size=(n, 40))]
        near = rng.random(n) < 0.10  # copy the previous prompt with one word changed
        words[1:][near[1:]] = words[:-1][near[1:]]
        words[near, -1] = vocab[rng.integers(0, len(vocab), size=near.sum())]
        prompts = [" ".join(w) for w in words]
        chosen = [f"good answer {i} " + " ".join(w[:10]) for i, w in zip(range(start, start + n), words)]
        rejected = [f"bad answer {i}" for i in range(start, start + n)]
        dup = rng.random(n) < 0.05  # exact duplicates of the previous pair
        for i in np.flatnonzero(dup[1:]) + 1:
            prompts[i], chosen[i], rejected[i] = prompts[i - 1], chosen[i - 1], rejected[i - 1]
        ids = [f"{start + i:032x}" for i in range(n)]  # curate never recomputes ids
        table = pa.table({
            "id": ids, "prompt": _messages("user", prompts), "chosen": _messages("assistant", chosen),
            "rejected": _messages("assistant", rejected), "source": ["bench.jsonl"] * n, "source_format": ["bench"] * n,
            "source_row": (np.arange(start, start + n) if order is None else order[start:start + n]) + 1,
            "chosen_score": pa.nulls(n, pa.float64()), "rejected_score": pa.nulls(n, pa.float64()), "meta": ["{}"] * n,
        }, schema=RECORD_SCHEMA)
        writer.write_table(table)
    writer.close()
    Manifest(stage="ingest", package_version="bench", config={}, counts=Counts(read=rows, kept=rows)).write(out)


def run_curate(src: Path, out: Path, chunk_rows: int | None) -> dict:
    from prefdata.curate import CurateConfig, curate

    options = {} if chunk_rows is None else {"chunk_rows": chunk_rows}
    start = time.perf_counter()
    manifest = curate(CurateConfig(inputs=[str(src)], out=str(out), **options))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "records_per_s": manifest.counts.read / seconds, "chunk_rows": manifest.config.get("chunk_rows"),
            "peak_rss_gib": peak_rss_mib() / 1024,
            "read": manifest.counts.read, "dropped": manifest.counts.dropped, "stats": manifest.stats}


def _generated(records: Path, rows: int) -> bool:
    path = records / "records.parquet"
    return path.is_file() and (records / "manifest.json").is_file() and pq.ParquetFile(path).metadata.num_rows == rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--chunk-rows", type=int, default=None, help="curate's chunk_rows (default: curate's default)")
    parser.add_argument("--shuffled", action="store_true", help="records out of output order (pass 2 bucket-sorts on disk)")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # measured in a fresh process so peak RSS is curate's own
        print(json.dumps(run_curate(args.child, args.child.parent / "curated", args.chunk_rows)))
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-curate-"))
    records = work / ("records-shuffled" if args.shuffled else "records")
    if not _generated(records, args.rows):
        generate(records, args.rows, shuffled=args.shuffled)
    command = [sys.executable, __file__, "--child", str(records)]
    if args.chunk_rows is not None:
        command += ["--chunk-rows", str(args.chunk_rows)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"curate failed:\n{result.stderr[-4000:]}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(json.dumps(report, indent=2))
    print(f"curate: {args.rows:,} records in {report['seconds']:.1f} s = {report['records_per_s']:,.0f} records/s, "
          f"peak RSS {report['peak_rss_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
