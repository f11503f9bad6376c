"""The Ray engine's overhead on one machine (issue 28): ingest and curate with --engine local and
--engine ray on the same inputs, each a fresh `prefdata` process, alternating.

    .venv/bin/python benchmarks/bench_engine.py [--rows 10000000 | --quick] [--repeats 1] [--workdir DIR]

Ingest reads generated Anthropic-HH rows (bench_ingest.write_rows), curate the uniform record set
of bench_curate.generate (exact and near duplicates). `--engine ray` without an address starts a
local Ray instance for the run, so its figures include Ray's start-up (a few seconds) on top of
the tasks' scheduling and the object store's copies; on a cluster the start-up is paid once by
`ray start`. After the runs the two engines' outputs are compared byte for byte (a bench of a
wrong output is no bench). docs/cluster.md projects N nodes from these figures.

Per run: wall seconds; CPU seconds of the whole process tree and of the driver (the `prefdata`
process alone: what stays on one process however many nodes run the tasks, the projection's S);
peak memory as the RSS sum over the tree and as the PSS sum (a shared page counted once: the RSS
sum counts Ray's object store once per worker that maps it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import bench_curate, bench_ingest  # noqa: E402

FULL_ROWS, QUICK_ROWS = 10_000_000, 20_000
ENGINES = ("local", "ray")
OUTPUTS = {"ingest": ("records.parquet", "quarantine.jsonl"), "curate": ("train.parquet", "eval.parquet", "dropped.parquet")}


def _command(stage: str, source: Path, out: Path, engine: str) -> list[str]:
    return [sys.executable, "-m", "prefdata", stage, str(source), "--out", str(out), "--engine", engine]


def _same_outputs(stage: str, outs: dict[str, Path]) -> None:
    for name in OUTPUTS[stage]:
        if (outs["local"] / name).read_bytes() != (outs["ray"] / name).read_bytes():
            sys.exit(f"{stage}: {name} differs between --engine local and --engine ray")


def run(rows: int, work: Path, repeats: int) -> dict[str, dict]:
    """{stage: {engine: {seconds, rows_per_s, peak_rss_mib, peak_pss_mib, cpu_seconds, driver_cpu_seconds}}},
    medians over `repeats`."""
    work.mkdir(parents=True, exist_ok=True)
    raw, records = work / "hh.jsonl", work / "records"
    bench_ingest.write_rows(raw, rows)
    bench_curate.generate(records, rows)
    results: dict[str, dict] = {}
    for stage, source in (("ingest", raw), ("curate", records)):
        outs = {engine: work / f"{stage}-{engine}" for engine in ENGINES}
        runs: dict[str, list[bench_ingest.Measured]] = {engine: [] for engine in ENGINES}
        for _ in range(repeats):
            for engine in ENGINES:
                runs[engine].append(bench_ingest.run_measured(_command(stage, source, outs[engine], engine), pss=True))
        _same_outputs(stage, outs)
        results[stage] = {engine: _figures(rows, runs[engine]) for engine in ENGINES}
        for out in outs.values():
            shutil.rmtree(out)
    return results


def _figures(rows: int, runs: list[bench_ingest.Measured]) -> dict[str, float]:
    median = bench_ingest.Measured(*(sorted(values)[len(values) // 2] for values in zip(*runs)))
    return {"seconds": median.seconds, "rows_per_s": rows / median.seconds, "peak_rss_mib": median.peak_rss / 2**20,
            "peak_pss_mib": median.peak_pss / 2**20, "cpu_seconds": median.cpu_seconds,
            "driver_cpu_seconds": median.driver_cpu_seconds}


def rows(results: dict[str, dict], row) -> list[dict]:
    """run_all's rows: the Ray engine as `ours`, the local engine as the peer (ratio = Ray / local)."""
    out = []
    for stage, engines in results.items():
        ray, local = engines["ray"], engines["local"]
        out += [row(f"{stage} [--engine ray, this machine]", "rows/s", ray["rows_per_s"], local["rows_per_s"], "--engine local",
                    "the engine's overhead"),
                row(f"{stage} [--engine ray, this machine]", "peak memory MiB (PSS summed over the process tree)",
                    ray["peak_pss_mib"], local["peak_pss_mib"], "--engine local", "—", False),
                row(f"{stage} [--engine ray, this machine]", "CPU seconds of the driver process alone (S)",
                    ray["driver_cpu_seconds"], local["driver_cpu_seconds"], "--engine local", "—", False)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=FULL_ROWS)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_ROWS:,} rows: a smoke test of the bench")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    rows_n = QUICK_ROWS if args.quick else args.rows
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-engine-"))
    results = run(rows_n, work, args.repeats)
    print(json.dumps(results, indent=2))
    for stage, engines in results.items():
        local, ray = engines["local"], engines["ray"]
        print(f"{stage}, {rows_n:,} rows: local {local['seconds']:.1f} s ({local['rows_per_s']:,.0f}/s), "
              f"ray {ray['seconds']:.1f} s ({ray['rows_per_s']:,.0f}/s): ray/local time {ray['seconds'] / local['seconds']:.2f}x; "
              f"driver CPU s local {local['driver_cpu_seconds']:.1f} / ray {ray['driver_cpu_seconds']:.1f}; peak PSS MiB "
              f"local {local['peak_pss_mib']:,.0f} / ray {ray['peak_pss_mib']:,.0f}")


if __name__ == "__main__":
    main()
