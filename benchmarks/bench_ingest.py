"""Ingest throughput and memory on generated Anthropic-HH rows (issue 2's target on a 2-core
machine: ≥ 30,000 rows/s and < 2 GiB peak RSS for 1,000,000 rows).

    .venv/bin/python benchmarks/bench_ingest.py [--rows 1000000] [--workers N] [--keep DIR]

Writes the rows as JSONL (multi-turn transcripts of varied length, 1% with chosen/rejected
prefixes that disagree, so the quarantine path runs too; kept between runs with --keep), then
times `prefdata ingest` in a child process, end to end (start-up, detection, hashing, parsing,
validation, parquet), with its peak memory and CPU time over all its processes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = """the a of to and in is it you that for on with as are be this was have not can what how
why when would could please explain tell me about write story code python garden river
winter recipe history music science answer question help thanks sure here""".split()


def _sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(low, high))).capitalize() + "."


def hh_row(rng: random.Random, broken: bool) -> str:
    turns = []
    for _ in range(rng.randint(1, 3)):
        turns += [f"\n\nHuman: {_sentence(rng, 4, 20)}", f"\n\nAssistant: {_sentence(rng, 5, 30)}"]
    prefix = "".join(turns[:-1])
    other = prefix.replace("Human: ", "Human: Hey, ", 1) if broken else prefix
    chosen = f"{prefix}\n\nAssistant: {_sentence(rng, 5, 40)}"
    rejected = f"{other}\n\nAssistant: {_sentence(rng, 3, 30)}"
    return json.dumps({"chosen": chosen, "rejected": rejected})


def write_rows(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(rows):
            fh.write(hh_row(rng, broken=i % 100 == 99) + "\n")


def _line_count(path: Path) -> int:
    with open(path, "rb") as fh:
        return sum(1 for _ in fh)


def run_measured(command: list[str]) -> tuple[float, int, float]:
    """Run `command`; return (wall seconds, peak RSS summed over its process tree, CPU seconds of
    the tree). Sampled every 0.1 s with psutil: the worker processes are grandchildren
    (forkserver), which getrusage(RUSAGE_CHILDREN) does not see."""
    import psutil

    start = time.perf_counter()
    proc = psutil.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak, cpu = 0, {}
    while proc.poll() is None:
        rss = 0
        for p in [proc, *proc.children(recursive=True)]:
            try:
                with p.oneshot():
                    rss += p.memory_info().rss
                    times = p.cpu_times()
                    cpu[p.pid] = times.user + times.system
            except psutil.NoSuchProcess:
                continue
        peak = max(peak, rss)
        time.sleep(0.1)
    if proc.returncode:
        sys.exit(f"ingest failed:\n{proc.stderr.read()}")
    return time.perf_counter() - start, peak, sum(cpu.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, help="passed to prefdata ingest (default: its own)")
    parser.add_argument("--keep", type=Path, help="write the input and output here instead of a temp dir")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    work.mkdir(parents=True, exist_ok=True)
    raw = work / "hh.jsonl"
    if not raw.exists() or _line_count(raw) != args.rows:  # --keep: reuse the rows of an earlier run
        write_rows(raw, args.rows)
    print(f"input: {args.rows:,} HH rows, {raw.stat().st_size / 2**20:,.0f} MiB; "
          f"load average before the run: {os.getloadavg()[0]:.2f} (other work on the machine slows it)")
    command = [sys.executable, "-m", "prefdata", "ingest", str(raw), "--out", str(work / "out")]
    if args.workers:
        command += ["--workers", str(args.workers)]
    shutil.rmtree(work / "out", ignore_errors=True)
    seconds, peak, cpu = run_measured(command)
    manifest = json.loads((work / "out" / "manifest.json").read_text())
    counts = manifest["counts"]
    print(f"counts: read {counts['read']:,}, kept {counts['kept']:,}, quarantined {counts['dropped']}")
    print(f"time: {seconds:.1f} s, {args.rows / seconds:,.0f} rows/s (workers: {manifest['config']['workers']})")
    print(f"CPU: {cpu:.1f} s in all processes, {cpu / seconds:.2f} cores busy on average, "
          f"{cpu / args.rows * 1e6:.0f} µs per row")
    print(f"peak RSS: {peak / 2**30:.2f} GiB (summed over the process tree)")


if __name__ == "__main__":
    main()
