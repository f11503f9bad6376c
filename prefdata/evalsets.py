"""Evaluation sets for decontamination, as plain texts.

Accepted: a `.txt` file (one item per line), a prefdata record-set directory (ingest or curate
output), or any raw file `prefdata ingest` can read (ingested into a temporary directory first;
prompts and answers of every record become items).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import polars as pl

from schemas.errors import UserError
from schemas.manifest import MANIFEST_NAME, Manifest
from schemas.records import RECORD_FILES

_CONTENTS = pl.element().struct.field("content")


def _record_texts(directory: Path) -> list[str]:
    stage = Manifest.read(directory, stages=tuple(RECORD_FILES)).stage
    frame = pl.concat([pl.read_parquet(directory / name) for name in RECORD_FILES[stage]])
    columns = [c for c in ("prompt", "chosen", "rejected", "completion") if c in frame.columns]  # pairs or unpaired
    parts = [frame.select(pl.col(c).list.eval(_CONTENTS).list.join("\n"))[c] for c in columns]
    return pl.concat(parts).to_list()


def _ingested_texts(path: Path) -> list[str]:
    from prefdata.ingest import IngestConfig, ingest

    with tempfile.TemporaryDirectory() as tmp:
        ingest(IngestConfig(inputs=[str(path)], out=tmp + "/eval"))
        return _record_texts(Path(tmp) / "eval")


def load_eval_texts(paths: list[str]) -> list[str]:
    texts: list[str] = []
    for path in map(Path, paths):
        if not path.exists():
            raise UserError(f"--decontaminate {path}: no such file or directory")
        if path.suffix == ".txt":
            texts += [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        elif (path / MANIFEST_NAME).is_file():
            texts += _record_texts(path)
        else:
            texts += _ingested_texts(path)
    return texts
