"""Ingest beside its peer on generated Anthropic-HH rows (issue 15: ≥ 1× the rows/s of `datasets`
JSON loading + `map` with the same number of processes, peak RSS under 1 GiB, 1,000,000 rows).

    .venv/bin/python benchmarks/bench_ingest.py [--rows 1000000] [--processes N] [--repeats 1] [--keep DIR]

Writes the rows as JSONL (multi-turn transcripts of varied length, 1% with chosen/rejected
prefixes that disagree, so the quarantine path runs too; kept between runs with --keep), then
times, each in a fresh process, alternating:
- ours: `prefdata ingest --workers N`, end to end (start-up, detection, parsing, validation,
  hashing, quarantine, parquet);
- the peer: `datasets.load_dataset("json")` into a fresh cache, then `.map(hh_messages,
  num_proc=N)`, which splits each transcript into prompt messages and the two answers, as ours
  does, without validation, hashing or quarantine.
Rows/s count input rows; peak RSS and CPU seconds are summed over each process tree.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

WORDS = """the a of to and in is it you that for on with as are be this was have not can what how
why when would could please explain tell me about write story code python garden river
winter recipe history music science answer question help thanks sure here""".split()

TURN_MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant):")  # the turn split ours uses (formats/hh.py)
LAST_ANSWER_MARKER = "\n\nAssistant:"
ROLES = {"Human": "user", "Assistant": "assistant"}


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


# ---------------------------------------------------------------- the peer


def hh_messages(example: dict) -> dict:
    """The peer's per-row conversion: an HH row → prompt messages, the chosen and rejected answers
    as one assistant message each, and whether the two transcripts share their prompt."""
    chosen, rejected = example["chosen"], example["rejected"]
    cut, other = chosen.rfind(LAST_ANSWER_MARKER), rejected.rfind(LAST_ANSWER_MARKER)
    parts = TURN_MARKER.split(chosen[:cut])
    prompt = [{"role": ROLES[name], "content": content.strip()} for name, content in zip(parts[1::2], parts[2::2])]
    return {"prompt": prompt,
            "chosen": [{"role": "assistant", "content": chosen[cut + len(LAST_ANSWER_MARKER):].strip()}],
            "rejected": [{"role": "assistant", "content": rejected[other + len(LAST_ANSWER_MARKER):].strip()}],
            "same_prompt": chosen[:cut] == rejected[:other]}


def peer_ingest(raw: Path, cache: Path, processes: int) -> int:
    from datasets import load_dataset

    # A fresh cache each run: a warm one would skip the JSON → Arrow conversion being measured.
    data = load_dataset("json", data_files=str(raw), split="train", cache_dir=tempfile.mkdtemp(dir=cache))
    data = data.map(hh_messages, num_proc=processes, remove_columns=["chosen", "rejected"])
    return len(data)


# ---------------------------------------------------------------- measuring


def commands(raw: Path, out: Path, cache: Path, processes: int) -> dict[str, list[str]]:
    """Ours and the peer, each a fresh process with `processes` worker processes."""
    return {
        "ours": [sys.executable, "-m", "prefdata", "ingest", str(raw), "--out", str(out), "--workers", str(processes)],
        "peer": [sys.executable, __file__, "--peer", str(raw), "--cache", str(cache), "--processes", str(processes)],
    }


class Measured(NamedTuple):
    seconds: float  # wall
    peak_rss: int  # bytes, summed over the process tree at the sample with the most
    cpu_seconds: float  # user + system of every process of the tree
    driver_cpu_seconds: float  # of the command's own process alone
    peak_pss: int | None  # bytes, with pss=True: shared pages divided among the processes that map them


def run_measured(command: list[str], pss: bool = False) -> Measured:
    """Run `command` and sample its process tree every 0.1 s with psutil (the worker processes are
    grandchildren, under a forkserver or Ray, which getrusage(RUSAGE_CHILDREN) does not see). The
    RSS sum counts a shared page once per process that maps it, which overstates a tree that
    shares much (Ray's object store is mapped by every worker); `pss` also sums the proportional
    set size, which counts it once in all (reading it walks each process's page tables, so it is
    sampled every second, not every 0.1 s)."""
    import psutil

    start = time.perf_counter()
    proc = psutil.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak, peak_pss, cpu, samples = 0, 0, {}, 0
    while proc.poll() is None:
        rss = proportional = 0
        with_pss = pss and samples % 10 == 0
        for p in [proc, *proc.children(recursive=True)]:
            try:
                with p.oneshot():
                    rss += p.memory_info().rss
                    proportional += p.memory_full_info().pss if with_pss else 0
                    times = p.cpu_times()
                    cpu[p.pid] = times.user + times.system
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        peak, peak_pss, samples = max(peak, rss), max(peak_pss, proportional), samples + 1
        time.sleep(0.1)
    if proc.returncode:
        sys.exit(f"{' '.join(command[:4])} failed:\n{proc.stderr.read()}")
    return Measured(time.perf_counter() - start, peak, sum(cpu.values()), cpu.get(proc.pid, 0.0), peak_pss if pss else None)


def compare(raw: Path, work: Path, processes: int, repeats: int) -> list[dict]:
    """Ours and the peer, alternating, `repeats` times each: one dict of figures per run."""
    rows = _line_count(raw)
    runs = []
    for repeat in range(repeats):
        for side, command in commands(raw, work / "out", work / "hf-cache", processes).items():
            (work / "hf-cache").mkdir(exist_ok=True)
            load = os.getloadavg()[0]
            seconds, peak, cpu, _, _ = run_measured(command)
            shutil.rmtree(work / "hf-cache")  # the peer's Arrow copies: ~2× the input per run
            runs.append({"side": side, "repeat": repeat, "processes": processes, "seconds": seconds,
                         "rows_per_s": rows / seconds, "peak_rss_mib": peak / 2**20, "cpu_s": cpu,
                         "load_before": load})
            print(_line(runs[-1]), flush=True)
    return runs


def _line(run: dict) -> str:
    return (f"{run['side']:>4} #{run['repeat'] + 1}: {run['seconds']:6.1f} s, {run['rows_per_s']:>7,.0f} rows/s, "
            f"peak RSS {run['peak_rss_mib']:,.0f} MiB, CPU {run['cpu_s']:.1f} s, "
            f"{run['processes']} worker processes, load average before {run['load_before']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--processes", type=int, default=os.cpu_count(),
                        help="worker processes on each side: ingest --workers, map num_proc (default: cores)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each side, alternating")
    parser.add_argument("--keep", type=Path, help="write the input and outputs here instead of a temp dir")
    parser.add_argument("--peer", type=Path, help=argparse.SUPPRESS)  # run the peer on this file (a child process)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer:
        peer_ingest(args.peer, args.cache, args.processes)
        return
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    work.mkdir(parents=True, exist_ok=True)
    raw = work / "hh.jsonl"
    if not raw.exists() or _line_count(raw) != args.rows:  # --keep: reuse the rows of an earlier run
        write_rows(raw, args.rows)
    print(f"input: {args.rows:,} HH rows, {raw.stat().st_size / 2**20:,.0f} MiB, {os.cpu_count()} cores "
          "(other work on the machine slows both sides: compare the sides of one run)")
    runs = compare(raw, work, args.processes, args.repeats)
    for repeat in range(args.repeats):
        ours, peer = (next(r for r in runs if r["side"] == side and r["repeat"] == repeat) for side in ("ours", "peer"))
        print(f"run {repeat + 1}: ours/peer rows/s {ours['rows_per_s'] / peer['rows_per_s']:.2f}×, "
              f"peak RSS peer/ours {peer['peak_rss_mib'] / ours['peak_rss_mib']:.2f}×")
    counts = json.loads((work / "out" / "manifest.json").read_text())["counts"]
    print(f"ours: read {counts['read']:,}, kept {counts['kept']:,}, quarantined {counts['dropped']}")


if __name__ == "__main__":
    main()
