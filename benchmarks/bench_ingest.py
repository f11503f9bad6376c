"""Ingest throughput and memory on generated Anthropic-HH rows (issue 2's target on a 2-core
machine: ≥ 30,000 rows/s and < 2 GiB peak RSS for 1,000,000 rows).

    .venv/bin/python benchmarks/bench_ingest.py [--rows 1000000] [--keep DIR]

Writes the rows as JSONL (multi-turn transcripts of varied length, 1% with chosen/rejected
prefixes that disagree, so the quarantine path runs too), then times `prefdata ingest` in a child
process, end to end (start-up, detection, hashing, parsing, validation, parquet), and reads the
child's peak RSS from the OS. Prints one line per figure.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the a of to and in is it you that for on with as are be this was have not can what how "
         "why when would could please explain tell me about write story code python garden river "
         "winter recipe history music science answer question help thanks sure here").split()


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--keep", type=Path, help="write the input and output here instead of a temp dir")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    work.mkdir(parents=True, exist_ok=True)
    raw = work / "hh.jsonl"
    write_rows(raw, args.rows)
    print(f"input: {args.rows:,} HH rows, {raw.stat().st_size / 2**20:,.0f} MiB")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "prefdata", "ingest", str(raw), "--out", str(work / "out")],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"ingest failed:\n{done.stderr}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    counts = json.loads((work / "out" / "manifest.json").read_text())["counts"]
    print(f"counts: read {counts['read']:,}, kept {counts['kept']:,}, quarantined {counts['dropped']}")
    print(f"time: {seconds:.1f} s, {args.rows / seconds:,.0f} rows/s")
    print(f"peak RSS: {peak_kib / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
