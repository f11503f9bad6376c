"""Stage 1: raw comparison dumps → validated records (DESIGN.md, "Data flow and files").

Two passes over the inputs. The first opens each source and reads its first rows only, to find
its format (or check the forced one): an input that cannot be used (missing, empty, unknown shape)
stops the run before anything is written. The second converts every row in worker processes: parse
(readers), convert (formats), validate (`PreferenceRecord`, or `UnpairedRecord` for unpaired
feedback: TRL's unpaired layout, a labelled --map, or any pair or rated source under --unpaired;
one run writes one kind); this process writes the kept records
in parquet row groups and every rejected row to quarantine.jsonl with its reason, in input order.
An uncompressed JSONL file is cut into byte ranges of whole lines that each worker reads itself,
so this process only orders and writes; other inputs are read here and sent in chunks of rows.
All files are written into a temporary directory that replaces `--out` only when the run
completes (schemas.location.output_dir: a rename, or for an object-store URI an upload with the
manifest last).

Counts are in input rows: read = kept + quarantined (by reason). A row is kept when it gave
records; a format that pairs several answers of one row gives several records for one kept row,
so the manifest's stats also hold the number of records.
"""

from __future__ import annotations

import gc
import json
import os
import platform
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from itertools import groupby, islice
from pathlib import Path
from typing import IO, Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pydantic
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from prefdata import __version__
from prefdata.engine import EngineOptions, Pool, session
from prefdata.formats.base import NON_BINARY_LABEL, SCORE_FIX, Format, FormatError, FormatOptions, Skipped
from prefdata.formats.registry import FORMATS, build_format, detect_format
from prefdata.formats.tabular import MAPPABLE_FIELDS
from prefdata.pairing import NON_FINITE_SCORE
from prefdata.readers import LineRange, RawRow, Row, Source, line_ranges, range_rows, resolve_sources
from schemas.cpus import usable_cpus
from schemas.errors import UserError
from schemas.io import sha256_file
from schemas.location import check_output, local_only, output_dir
from schemas.manifest import QUARANTINE_FILE, Counts, Manifest
from schemas.progress import progress
from schemas.records import (
    PAIRED,
    UNPAIRED,
    PreferenceRecord,
    UnpairedRecord,
    record_schema,
    records_to_table,
    unpaired_to_table,
)

RECORDS_FILE = "records.parquet"
NO_PAIRS = "no_pairs"
NO_COMPLETIONS = "no_completions"
# Per record kind: the model candidates are validated as, how a list of them becomes a table, the
# prefix of a record that failed in a row that kept others (stats.skipped), and the word for a record.
_KINDS = {
    PAIRED: (PreferenceRecord, records_to_table, "pair", NO_PAIRS),
    UNPAIRED: (UnpairedRecord, unpaired_to_table, "completion", NO_COMPLETIONS),
}

SAMPLE_ROWS = 10  # parsed rows whose columns decide the format
PEEK_ROWS = 1000  # rows read at most to find them
CHUNK_ROWS = 1000  # rows converted into one record table
RANGE_BYTES = 8 << 20  # bytes of a JSONL file per unit of work for a worker process (~10k HH rows)


class IngestConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: list[str] = Field(min_length=1, description="Files (.jsonl/.json/.csv/.parquet, optionally .gz/.zst/.bz2), "
                              "directories, globs, save_to_disk directories or Hub dataset names.")
    out: str = Field(description="Directory, or object-store URI (s3://…; docs/cluster.md), for records.parquet, quarantine.jsonl, "
                     "manifest.json.")
    format: str = Field("auto", description="auto (from the columns) or a format name: " + ", ".join(FORMATS) + ".")
    options: FormatOptions = FormatOptions()
    limit: int | None = Field(None, gt=0, description="Read at most N rows in total.")
    split: str | None = Field(None, description="Split of a Hub dataset (default train) or of a save_to_disk dict.")
    row_group_rows: int = Field(20_000, gt=0, description="Records per parquet row group.")
    # pydantic validation is the CPU-bound part, hence processes
    workers: int = Field(default_factory=usable_cpus, gt=0, description="Processes that read, convert and validate rows "
                         "(default: one per usable CPU).")
    execution: EngineOptions = EngineOptions()

    @model_validator(mode="after")
    def _format_and_map(self) -> IngestConfig:
        if self.format != "auto" and self.format not in FORMATS:
            raise UserError(f"--format {self.format}: unknown; use auto or one of {', '.join(FORMATS)}")
        column_map = self.options.column_map
        if column_map and self.format not in ("auto", "tabular"):
            raise UserError(f"--map is for the tabular format; drop it or --format {self.format}")
        if column_map:
            self.format = "tabular"
        return self


def parse_column_map(text: str | None) -> dict[str, str]:
    """`system=system,prompt=question` → {"system": "system", "prompt": "question"}."""
    if not text:
        return {}
    column_map = {}
    for item in text.split(","):
        record_field, sep, column = (part.strip() for part in item.partition("="))
        if not sep or not record_field or not column:
            raise UserError(f"--map: '{item}' is not field=column (e.g. --map system=system,prompt=question)")
        if record_field not in MAPPABLE_FIELDS:
            raise UserError(f"--map: unknown field '{record_field}'; fields are {', '.join(MAPPABLE_FIELDS)}")
        column_map[record_field] = column
    return column_map


# ---------------------------------------------------------------- pass 1: formats


def _format_for(source: Source, config: IngestConfig) -> Format:
    """Read the source's first rows; detect its format (or check the columns --map names)."""
    rows = source.rows()
    try:
        peeked = [row.parse() for row in islice(rows, PEEK_ROWS)]
    finally:
        rows.close()
    if not peeked:
        raise UserError(f"{source.location}: no rows (empty input); remove it from the inputs")
    sample = [raw.value for raw in peeked if raw.value is not None][:SAMPLE_ROWS]
    if config.format == "auto" and not sample:
        reason, message = peeked[0].error  # type: ignore[misc]  # no value means an error
        hint = "; a JSON array belongs in a .json file" if peeked[0].raw().lstrip().startswith("[") else ""
        raise UserError(
            f"{source.location}: none of the first {len(peeked)} rows parses (row {peeked[0].number}: "
            f"{reason}, {message}){hint}; fix the file, or pass --format to quarantine them all"
        )
    name = config.format if config.format != "auto" else detect_format(source.location, sample)
    columns = frozenset().union(*(row.keys() for row in sample))
    fmt = build_format(name, config.options, columns, (raw.value for raw in peeked if raw.value is not None), source.location)
    if config.options.unpaired and fmt.rated and config.options.score_threshold is None:
        raise UserError(f"{source.location}: format {name} rates its answers; --unpaired needs --score-threshold T "
                        "(an answer scored T or more is desirable)")
    missing = fmt.required_columns() - columns
    if sample and missing:
        raise UserError(
            f"{source.location}: format {name} needs column(s) {', '.join(sorted(missing))}; "
            f"the rows have [{', '.join(sorted(columns))}] (see --map)"
        )
    return fmt


def _record_kind(sources: list[Source], formats: list[Format], config: IngestConfig) -> str:
    """The one kind of record this run writes; a UserError for inputs of both kinds, or for a
    --score-threshold that no input uses."""
    kinds = {fmt.kind for fmt in formats}
    if len(kinds) > 1:
        paired = next(s.location for s, f in zip(sources, formats) if f.kind == PAIRED)
        raise UserError(f"{paired} holds pairs, other inputs unpaired feedback; add --unpaired to split the pairs into "
                        "labelled completions, or ingest them apart")
    if config.options.score_threshold is not None and not any(f.rated for f in formats):
        raise UserError("--score-threshold: no input rates its answers (UltraFeedback, HelpSteer2, judged, scored --map "
                        "columns); drop it")
    return kinds.pop()


# ---------------------------------------------------------------- pass 2: rows


def _convert_row(
    raw: RawRow, source: Source, fmt: Format, skipped: Counter[str]
) -> list[PreferenceRecord | UnpairedRecord] | tuple[str, str]:
    """The row's validated records, or the (reason, message) it is quarantined with. Parts of the
    row left out are added to `skipped`: the format's notes, and records that failed validation in
    a row that kept others."""
    if raw.error:
        return raw.error
    model, _, noun, nothing = _KINDS[fmt.kind]
    records, failures, notes = [], [], Counter[str]()
    provenance = {"source": source.name, "source_format": fmt.name, "source_row": raw.number}
    try:
        for item in fmt.candidates(raw.value):  # type: ignore[arg-type]  # no error means a value
            if isinstance(item, Skipped):
                notes[item.reason] += item.count
                continue
            try:
                records.append(model.model_validate({**item, **provenance}))
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                failures.append((first["type"], f"{where}: {first['msg']}" if where else first["msg"]))
    except FormatError as exc:
        return exc.reason, exc.message
    except OverflowError:  # float() of an integer past 1e308, which the JSON parsers accept
        return NON_FINITE_SCORE, "a number too large for a float"
    if not records:
        return failures[0] if failures else (nothing, f"format {fmt.name} found no {noun} in this row")
    # Parts left out are counted for kept rows only: a quarantined row is counted whole, by its reason.
    skipped.update(notes)
    skipped.update(f"{noun}_{reason}" for reason, _ in failures)
    return records


def _quarantine_line(source: Source, raw: RawRow, reason: str, message: str) -> str:
    entry = {"source": source.name, "source_row": raw.number, "reason": reason, "message": message, "raw": raw.raw()}
    return json.dumps(entry, ensure_ascii=False) + "\n"


@dataclass
class _Chunk:
    """What converting a chunk of rows gives (in a worker process, or here)."""

    table: pa.Table
    quarantine: list[str]
    read: int
    kept: int
    prompts: int  # distinct prompts among each kept row's records, summed over rows
    dropped: Counter[str]
    skipped: Counter[str]
    desirable: int  # unpaired records labelled desirable (0 for pairs)


class _Group(NamedTuple):
    """Consecutive rows of one group (formats with `group_by`): converted together, counted as
    their number of rows, and kept or quarantined together."""

    rows: list[RawRow]

    def value(self) -> RawRow:
        """The group as one row, `{"rows": [...]}`, numbered by its first row."""
        first = self.rows[0]
        return first if first.error else RawRow(first.number, {"rows": [r.value for r in self.rows]})


def _grouped(rows: Iterable[Row], key: str) -> Iterator[_Group]:
    """Rows parsed here and grouped by equal consecutive `key` values; a row that did not parse
    is a group of its own (and is quarantined with its reason)."""
    parsed = (row.parse() for row in rows)
    for _, members in groupby(parsed, key=lambda raw: raw.value.get(key) if raw.value else object()):
        yield _Group(list(members))


def _convert_chunk(source: Source, fmt: Format, items: list[Row | _Group]) -> _Chunk:
    records: list[Any] = []
    quarantine, dropped, skipped, read, kept, prompts = [], Counter[str](), Counter[str](), 0, 0, 0
    for item in items:
        members = item.rows if isinstance(item, _Group) else [item.parse()]
        result = _convert_row(item.value() if isinstance(item, _Group) else members[0], source, fmt, skipped)
        read += len(members)
        if isinstance(result, tuple):
            dropped[result[0]] += len(members)
            quarantine.extend(_quarantine_line(source, raw, *result) for raw in members)
        else:
            records.extend(result)
            kept += len(members)
            prompts += 1 if len(result) == 1 else len({tuple(r.prompt) for r in result})
    table = _KINDS[fmt.kind][1](records)
    desirable = (pc.sum(table["label"]).as_py() or 0) if fmt.kind == UNPAIRED else 0
    return _Chunk(table, quarantine, read, kept, prompts, dropped, skipped, desirable)


def _chunks(items: Iterable[Row | _Group], size: int) -> Iterator[list[Row | _Group]]:
    items = iter(items)
    while chunk := list(islice(items, size)):
        yield chunk


@contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Converting rows makes short-lived objects without cycles (records, messages, dicts) that
    reference counting frees; the cyclic collector's passes over them cost ~15% of the conversion
    (measured on HH rows), so it waits until the job is done."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


Work = LineRange | list[Row | _Group]  # a worker's unit: lines it reads itself, or rows read here


def _convert(job: tuple[Source, Format, Work, int]) -> list[_Chunk]:
    """One unit of work, in a worker process (or here, with one worker): its rows converted
    `chunk_rows` at a time."""
    source, fmt, work, chunk_rows = job
    with _cyclic_gc_paused():
        if isinstance(work, LineRange):
            return [_convert_chunk(source, fmt, rows) for rows in _chunks(range_rows(source, work), chunk_rows)]
        return [_convert_chunk(source, fmt, work)]


def _work(source: Source, fmt: Format, limit: int | None, range_bytes: int, chunk_rows: int) -> Iterator[Work]:
    """The source's units of work, in input order. Line ranges where the file allows them; rows
    read here otherwise: compressed files, JSON arrays, CSV, parquet and datasets have no line
    boundaries to cut at, a format's group (`group_by`: OASST trees, HelpSteer2 prompts) could
    straddle a cut, and --limit counts rows, which a worker cannot know of the ranges before its own."""
    if limit is None and fmt.group_by is None and source.has_line_ranges():
        return line_ranges(source, range_bytes)
    rows = source.rows() if limit is None else islice(source.rows(), limit)
    items = rows if fmt.group_by is None else _grouped(rows, fmt.group_by)
    return _chunks(items, chunk_rows)


def _source_jobs(unit: tuple[Source, Format, int | None, int, int]) -> Iterator[tuple[Source, Format, Work, int]]:
    """A source's jobs, in input order: the engine's read of one source. The unit carries the
    sizes the jobs are cut to, so that a worker process (which imports this module afresh) cuts
    them as this one was told to."""
    source, fmt, limit, range_bytes, chunk_rows = unit
    return ((source, fmt, work, chunk_rows) for work in _work(source, fmt, limit, range_bytes, chunk_rows))


class _RecordWriter:
    """Record tables → parquet, row groups of exactly `row_group_rows` (the last one less), so
    memory stays flat and the file's bytes depend on the records only, not on how they were cut
    into tables (any number of workers, any range size)."""

    def __init__(self, path: Path, row_group_rows: int, kind: str) -> None:
        self._path, self._row_group_rows, self._schema = path, row_group_rows, record_schema(kind)
        self._tables: list[pa.Table] = []
        self._pending = 0
        self.written = 0

    def __enter__(self) -> _RecordWriter:
        self._writer = pq.ParquetWriter(self._path, self._schema, compression="zstd")
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self._flush()
        self._writer.close()

    def add(self, table: pa.Table) -> None:
        self._tables.append(table)
        self._pending += table.num_rows
        while self._pending >= self._row_group_rows:
            self._flush()

    def _flush(self) -> None:
        """Write the first `row_group_rows` pending rows (all of them at the end) as one row group."""
        if not self._pending:
            return
        pending = pa.concat_tables(self._tables)
        group = pending.slice(0, self._row_group_rows)
        # One chunk per column: the writer's pages would otherwise follow the tables' boundaries.
        self._writer.write_table(group.combine_chunks(), row_group_size=group.num_rows)
        self.written += group.num_rows
        rest = pending.slice(group.num_rows)
        self._tables, self._pending = [rest], rest.num_rows


@dataclass
class _SourceTally:
    format: str
    read: int = 0
    kept: int = 0
    records: int = 0
    prompts: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    desirable: int = 0

    def add(self, chunk: _Chunk) -> None:
        self.read += chunk.read
        self.kept += chunk.kept
        self.records += chunk.table.num_rows
        self.prompts += chunk.prompts
        self.dropped.update(chunk.dropped)
        self.skipped.update(chunk.skipped)
        self.desirable += chunk.desirable

    def labels(self) -> dict[str, int]:
        return {"desirable": self.desirable, "undesirable": self.records - self.desirable}

    def stats(self, kind: str) -> dict[str, Any]:
        stats = {"format": self.format, "read": self.read, "kept": self.kept, "dropped": dict(self.dropped),
                 "records": self.records, "prompts": self.prompts, "skipped": dict(self.skipped)}
        return {**stats, "labels": self.labels()} if kind == UNPAIRED else stats


def _counts(tallies: list[_SourceTally]) -> Counts:
    dropped: Counter[str] = Counter()
    for t in tallies:
        dropped.update(t.dropped)
    return Counts(read=sum(t.read for t in tallies), kept=sum(t.kept for t in tallies),
                  dropped=dict(dropped.most_common()))


def _labels(tallies: list[_SourceTally]) -> dict[str, int]:
    desirable = sum(t.desirable for t in tallies)
    return {"desirable": desirable, "undesirable": sum(t.records for t in tallies) - desirable}


def _per_format(tallies: list[_SourceTally]) -> dict[str, dict[str, int]]:
    formats: dict[str, Counter[str]] = {}
    for t in tallies:
        formats.setdefault(t.format, Counter()).update(read=t.read, kept=t.kept)
    return {name: dict(c) for name, c in formats.items()}


def _ingest_source(
    source: Source, fmt: Format, limit: int | None, converter: Pool, records: _RecordWriter,
    quarantine: IO[str], bar: Any,
) -> _SourceTally:
    tally = _SourceTally(fmt.name)
    hub = source.kind == "hub"  # streamed from the Hub: read on this process's node, where its format was detected
    # A file's path made absolute: a Ray task's working directory is not this process's.
    unit = (source if hub else replace(source, location=os.path.abspath(source.location)), fmt, limit, RANGE_BYTES, CHUNK_ROWS)
    for chunks in converter.map_units([unit], _source_jobs, here=hub):
        for chunk in chunks:
            records.add(chunk.table)
            quarantine.writelines(chunk.quarantine)
            tally.add(chunk)
            bar.advance(chunk.read, kept=tally.kept, source=source.name)
    return tally


@contextmanager
def _hashing(sources: list[Source]) -> Iterator[list[Future[str] | None]]:
    """The input files' sha256 for the manifest, computed on a thread while the workers convert
    (hashlib releases the GIL): hashed after the conversion, a 700 MiB input added 1.6 s to the
    run with every worker done. After an error, the files not hashed yet are left alone."""
    hasher = ThreadPoolExecutor(1)
    try:
        yield [hasher.submit(sha256_file, source.location) if source.is_file else None for source in sources]
    finally:
        hasher.shutdown(cancel_futures=True)


def _local_inputs(specs: list[str], sources: list[Source]) -> list[str]:
    """The files read and the folders given (not globs or Hub names): what --out must not hold or sit in."""
    return [spec for spec in specs if os.path.isdir(spec)] + [source.location for source in sources if source.is_file]


def ingest(config: IngestConfig) -> Manifest:
    for given in config.inputs:
        local_only("ingest", {"INPUTS": given})
    sources = resolve_sources(config.inputs, config.split)
    local_inputs = _local_inputs(config.inputs, sources)
    check_output(config.out, local_inputs)  # before the formats are sniffed
    formats = [_format_for(source, config) for source in sources]
    kind = _record_kind(sources, formats, config)
    tallies: list[_SourceTally] = []
    left = config.limit  # rows still to read under --limit
    with (
        output_dir(config.out, local_inputs) as tmp,
        _hashing(sources) as hashes,
        session(config.execution) as engine,
    ):
        with (
            engine.pool(_convert, config.workers) as converter,
            _RecordWriter(tmp / RECORDS_FILE, config.row_group_rows, kind) as records,
            open(tmp / QUARANTINE_FILE, "w", encoding="utf-8") as quarantine,
            progress("ingest") as bar,
        ):
            for source, fmt in zip(sources, formats):
                tallies.append(_ingest_source(source, fmt, left, converter, records, quarantine, bar))
                _refuse_non_binary_labels(source, tallies[-1])
                left = None if left is None else left - tallies[-1].read
        manifest = Manifest(
            stage="ingest",
            package_version=__version__,
            config=config.model_dump(mode="json"),
            inputs=[s.describe(t.read, h.result() if h else None) for s, t, h in zip(sources, tallies, hashes)],
            counts=_counts(tallies),
            outputs=[RECORDS_FILE, QUARANTINE_FILE],
            stats={
                "kind": kind,
                "records": records.written,
                "prompts": sum(t.prompts for t in tallies),
                "skipped": dict(sum((t.skipped for t in tallies), Counter()).most_common()),
                "sources": {s.name: t.stats(kind) for s, t in zip(sources, tallies)},
                "formats": _per_format(tallies),
                **({"labels": _labels(tallies)} if kind == UNPAIRED else {}),
            },
            versions={"python": platform.python_version(), "pyarrow": pa.__version__, "pydantic": pydantic.VERSION},
        )
        manifest.write(tmp)
    return manifest


def _refuse_non_binary_labels(source: Source, tally: _SourceTally) -> None:
    """A feedback label column whose rows past the sampled ones hold numbers other than 0/1 is a
    rating: its 0s and 1s were read as labels, so the run stops (nothing is written)."""
    rows = tally.dropped.get(NON_BINARY_LABEL, 0)
    if rows:
        raise UserError(f"{source.location}: {rows} rows' label holds a number other than 0/1 (quarantine reason "
                        f"{NON_BINARY_LABEL}): the column is a rating or a -1/0/+1 scale, whose 0s and 1s are not binary "
                        f"labels; {SCORE_FIX}")


def summary_lines(manifest: Manifest) -> list[str]:
    c, stats = manifest.counts, manifest.stats
    lines = [f"ingest: read {c.read}, kept {c.kept}, quarantined {sum(c.dropped.values())} {json.dumps(c.dropped)}"]
    labels = stats.get("labels")
    if labels or stats["records"] != c.kept or stats["skipped"]:
        records = (f"{stats['records']} unpaired completions ({labels['desirable']} desirable, "
                   f"{labels['undesirable']} undesirable)" if labels else f"{stats['records']} pairs")
        lines.append(f"  {records} from {stats['prompts']} prompts; parts of rows left out: {json.dumps(stats['skipped'])}")
    for name, entry in manifest.stats["sources"].items():
        lines.append(f"  {name} ({entry['format']}): read {entry['read']}, kept {entry['kept']}")
    return lines
