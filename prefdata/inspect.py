"""`prefdata inspect DIR`: what any stage's output holds, read through its manifest.

Lengths are tokens for shards and characters for record sets, computed with polars expressions
over the Arrow/Parquet files (lazily: only the length columns are materialised). The parts
measured are the file's own: prompt, chosen, rejected for pairs; prompt, completion (and in
shards the KL completion) for unpaired records, whose label balance is counted too.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from schemas.errors import UserError, first_line
from schemas.location import input_dirs
from schemas.manifest import Manifest
from schemas.records import MESSAGES_TYPE, RECORD_FILES, record_kind
from schemas.shard import REF_COLUMNS_OF, shard_kind

QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99}
IDS_SUFFIX = "_input_ids"


def _data_files(directory: Path, manifest: Manifest) -> list[Path]:
    if manifest.shards:
        return [directory / s.name for s in manifest.shards]
    return [directory / name for name in RECORD_FILES.get(manifest.stage, {})]


def _scan(path: Path) -> pl.LazyFrame:
    return pl.scan_ipc(path) if path.suffix == ".arrow" else pl.scan_parquet(path)


def parts(schema: pa.Schema, is_shard: bool) -> list[str]:
    """The parts a file holds: its token-id columns (a shard) or message-list columns (a record set)."""
    if is_shard:
        return [f.name.removesuffix(IDS_SUFFIX) for f in schema if f.name.endswith(IDS_SUFFIX)]
    return [f.name for f in schema if f.type == MESSAGES_TYPE]


def _length_exprs(names: list[str], is_shard: bool) -> list[pl.Expr]:
    if is_shard:
        return [pl.col(f"{part}{IDS_SUFFIX}").list.len().alias(part) for part in names]
    chars = pl.element().struct.field("content").str.len_chars()
    return [pl.col(part).list.eval(chars).list.sum().alias(part) for part in names]


def length_quantiles(files: list[Path], names: list[str], is_shard: bool) -> dict[str, dict[str, int]]:
    """p50/p90/p99/max of each part's lengths over all files."""
    if not files:
        return {}
    lengths = pl.concat([_scan(f).select(_length_exprs(names, is_shard)) for f in files])
    aggs = [pl.col(part).quantile(q, interpolation="nearest").alias(f"{part}.{name}") for part in names for name, q in QUANTILES.items()]
    aggs += [pl.col(part).max().alias(f"{part}.max") for part in names]
    row = lengths.select(aggs).collect().row(0, named=True)
    return {part: {stat: int(row[f"{part}.{stat}"] or 0) for stat in [*QUANTILES, "max"]} for part in names}


def label_balance(files: list[Path]) -> dict[str, dict[str, int]]:
    """Unpaired records and shards: desirable / undesirable rows per file."""
    counts = {}
    for f in files:
        row = _scan(f).select(desirable=pl.col("label").sum(), rows=pl.len()).collect().row(0, named=True)
        counts[f.name] = {"desirable": int(row["desirable"] or 0), "undesirable": int(row["rows"] - (row["desirable"] or 0))}
    return counts


def _schema_and_rows(path: Path, stage: str) -> tuple[pa.Schema, int]:
    try:
        if path.suffix == ".arrow":
            reader = ipc.open_file(str(path))
            return reader.schema, sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
        meta = pq.ParquetFile(path)
        return meta.schema_arrow, meta.metadata.num_rows
    except pa.ArrowInvalid as exc:  # cut short (a copy or a disk that stopped mid-file) or overwritten
        raise UserError(f"{path}: not a readable {'Arrow' if path.suffix == '.arrow' else 'Parquet'} file ({first_line(exc)}); "
                        f"it is truncated or corrupted: re-run prefdata {stage}") from None


def _samples(files: list[Path], manifest: Manifest, names: list[str], n: int, seed: int) -> list[dict[str, Any]]:
    if n <= 0 or not files:
        return []
    frame = pl.concat([_scan(f) for f in files], how="diagonal_relaxed").collect()
    picks = sorted(random.Random(seed).sample(range(frame.height), min(n, frame.height)))
    rows = frame[picks].to_dicts()
    # The label, and a shard's reference log-probs, where the files have them.
    extra = ["label", *(c for columns in REF_COLUMNS_OF.values() for c in columns)]
    if not manifest.shards:
        return [{"id": r["id"], **{p: _render_messages(r[p]) for p in names}, **{k: r[k] for k in extra if k in r}} for r in rows]
    decode = _decoder(manifest)
    return [{"id": r["id"], **{p: decode(r[f"{p}{IDS_SUFFIX}"]) for p in names}, **{k: r[k] for k in extra if k in r}}
            for r in rows]


def _render_messages(messages: list[dict]) -> str:
    return "\n".join(f"[{m['role']}] {m['content']}" for m in messages)


def _decoder(manifest: Manifest):
    from prefdata.tokenize import load_tokenizer

    tokenizer = load_tokenizer(manifest.tokenizer.name_or_path)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=False)


class InspectConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    directory: str = Field(description="Any stage's output directory (or object-store URI).")
    sample: int = Field(0, ge=0, description="Show N decoded examples.")
    seed: int = Field(0, description="Which examples --sample picks.")
    as_json: bool = Field(False, description="Machine-readable report on stdout.")


def inspect_dir(directory: str | Path, sample: int = 0, seed: int = 0) -> dict[str, Any]:
    """The report on a stage's output: a directory, or an object-store URI (downloaded first)."""
    with input_dirs([str(directory)]) as (local,):
        return {**_inspect_local(local, sample, seed), "directory": str(directory)}


def _inspect_local(directory: Path, sample: int, seed: int) -> dict[str, Any]:
    manifest = Manifest.read(directory)
    files = _data_files(directory, manifest)
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{directory}: {', '.join(missing)} listed in the manifest but missing; re-run prefdata {manifest.stage}")
    is_shard = bool(manifest.shards)
    per_file = {f.name: _schema_and_rows(f, manifest.stage) for f in files}
    schema = next(iter(per_file.values()))[0] if per_file else pa.schema([])
    names = parts(schema, is_shard)
    kind = (shard_kind(schema) if is_shard else record_kind(schema.names)) if per_file else None
    report: dict[str, Any] = {
        "directory": str(directory),
        "stage": manifest.stage,
        "schema_version": manifest.schema_version,
        "package_version": manifest.package_version,
        "kind": kind,
        "schema": [f"{f.name}: {f.type}" for f in schema],
        "rows_per_file": {name: rows for name, (_, rows) in per_file.items()},
        "length_unit": "tokens" if is_shard else "characters",
        "lengths": length_quantiles(files, names, is_shard),
        "labels": label_balance(files) if "label" in schema.names else None,
        "counts": manifest.counts.model_dump(),
        "tokenizer": manifest.tokenizer.model_dump() if manifest.tokenizer else None,
        "reference": manifest.reference.model_dump() if manifest.reference else None,
        "stats": manifest.stats,
    }
    if sample:
        report["samples"] = _samples(files, manifest, names, sample, seed)
    return report


def render(report: dict[str, Any]) -> None:
    """Rich tables for a person at a terminal (plain text when piped: rich detects it)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{report['directory']}[/]: stage [cyan]{report['stage']}[/], {report['kind'] or 'no'} records, "
                  f"schema v{report['schema_version']}, prefdata {report['package_version']}")
    labels = report["labels"]
    files = Table("file", "rows", *(["desirable", "undesirable"] if labels else []), title="files")
    for name, rows in report["rows_per_file"].items():
        files.add_row(name, f"{rows:,}", *(f"{labels[name][k]:,}" for k in ("desirable", "undesirable")) if labels else ())
    console.print(files)
    counts = report["counts"]
    reasons = Table("", "rows", title="accounting")
    reasons.add_row("read", f"{counts['read']:,}")
    reasons.add_row("kept", f"{counts['kept']:,}")
    for reason, n in sorted(counts["dropped"].items(), key=lambda kv: -kv[1]):
        reasons.add_row(f"dropped: {reason}", f"{n:,}")
    console.print(reasons)
    if report["lengths"]:
        lengths = Table("part", *QUANTILES, "max", title=f"lengths ({report['length_unit']})")
        for part, stats in report["lengths"].items():
            lengths.add_row(part, *(f"{v:,}" for v in stats.values()))
        console.print(lengths)
    console.print("schema: " + "; ".join(report["schema"]))
    for key in ("tokenizer", "reference"):
        if report[key]:
            console.print(f"{key}: " + ", ".join(f"{k}={v}" for k, v in report[key].items()))
    for sample in report.get("samples", []):
        console.rule(sample["id"])
        for key, value in sample.items():
            if key != "id":
                console.print(f"[bold]{key}[/]: {escape(str(value))}", highlight=False)
