"""Write small record sets in the ingest / curate layout for tests of later stages."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from schemas.manifest import Counts, Manifest
from schemas.records import PreferenceRecord, UnpairedRecord, records_to_table, unpaired_to_table


def make_record(prompt, chosen, rejected, row=1, **extra) -> PreferenceRecord:
    """`prompt` is a list of (role, content) or a single user string; answers are strings or
    lists of (role, content)."""

    def msgs(x, default_role):
        if isinstance(x, str):
            return [{"role": default_role, "content": x}]
        return [{"role": role, "content": content} for role, content in x]

    return PreferenceRecord.model_validate(
        dict(prompt=msgs(prompt, "user"), chosen=msgs(chosen, "assistant"), rejected=msgs(rejected, "assistant"),
             source="test", source_format="test", source_row=row, **extra)
    )


def write_records_dir(out: Path, splits: dict[str, list[PreferenceRecord]], stage: str = "curate") -> Path:
    """`splits` maps file stem → records: {"records": [...]} for ingest, {"train": .., "eval": ..} for curate."""
    out.mkdir(parents=True, exist_ok=True)
    total = 0
    for stem, records in splits.items():
        unpaired = bool(records) and isinstance(records[0], UnpairedRecord)
        pq.write_table(unpaired_to_table(records) if unpaired else records_to_table(records), out / f"{stem}.parquet")
        total += len(records)
    Manifest(stage=stage, package_version="test", config={}, counts=Counts(read=total, kept=total)).write(out)
    return out


def unpaired_from_pairs(pairs: list[PreferenceRecord]) -> list[UnpairedRecord]:
    """One unpaired record per pair, alternating: the chosen answer as desirable (even rows), the
    rejected one as undesirable (odd rows), so every prompt appears once."""
    return [UnpairedRecord(prompt=r.prompt, completion=r.chosen if i % 2 == 0 else r.rejected, label=i % 2 == 0,
                           source=r.source, source_format=r.source_format, source_row=r.source_row)
            for i, r in enumerate(pairs)]
