"""Run `prefdata ingest` in-process on test inputs and read back what it wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from prefdata.ingest import IngestConfig, ingest
from schemas.manifest import Manifest

FIXTURES = Path(__file__).parent / "fixtures" / "ingest"


def run_ingest(out: Path, *inputs: str | Path, **options) -> tuple[list[dict], list[dict], Manifest]:
    """(records as dicts, quarantine entries, manifest); one worker unless `workers` is given."""
    options.setdefault("workers", 1)
    manifest = ingest(IngestConfig(inputs=[str(i) for i in inputs], out=str(out), **options))
    records = pq.read_table(out / "records.parquet").to_pylist()
    text = (out / "quarantine.jsonl").read_text(encoding="utf-8")
    quarantine = [json.loads(line) for line in text.split("\n") if line]  # not splitlines: raw text may hold U+2028
    assert Manifest.read(out, stages=("ingest",)) == manifest
    return records, quarantine, manifest


def turns(messages: list[dict]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in messages]


def pairs(records: list[dict]) -> list[tuple]:
    """Each record as (source_row, prompt turns, chosen turns, rejected turns)."""
    return [(r["source_row"], turns(r["prompt"]), turns(r["chosen"]), turns(r["rejected"])) for r in records]


def reasons(quarantine: list[dict]) -> dict[int, str]:
    return {q["source_row"]: q["reason"] for q in quarantine}
