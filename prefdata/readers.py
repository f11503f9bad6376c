"""Raw inputs → a stream of rows, one source at a time, never a whole file in memory.

Inputs (`prefdata ingest RAW...`): `.jsonl` / `.json` / `.csv` / `.parquet` files, each optionally
`.gz` / `.zst` / `.bz2`; directories (every such file inside, recursively) and globs; a directory
written by `datasets.save_to_disk`; a Hub dataset name (`datasets.load_dataset`, streamed).

`.jsonl` / `.ndjson` files are one JSON object per line, always: an array there is a bad row like
any other. A `.json` file is read by what it holds: one JSON array (streamed element by element)
when its first non-blank character is '[', else one object per line.
Uncompressed files of lines can also be cut into `LineRange`s of whole lines that worker processes
read themselves (`line_ranges` here, `range_rows` there), numbered exactly as one reader would.
Rows that cannot be parsed come out as `RawRow`s with an error reason (invalid_json, invalid_utf8,
truncated_line, …) so the stage quarantines them and goes on. An input that cannot be used at all
(missing, unreadable, no rows, a Hub dataset that cannot be fetched) is a UserError.
"""

from __future__ import annotations

import bz2
import csv
import glob
import gzip
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple

import orjson

from schemas.errors import UserError, first_line
from schemas.io import sha256_file
from schemas.manifest import MANIFEST_NAME, QUARANTINE_FILE, InputFile, Manifest
from schemas.records import RECORD_FILES

INVALID_JSON = "invalid_json"
NESTED_TOO_DEEPLY = "nested too deeply to read (Python's recursion limit)"
INVALID_UTF8 = "invalid_utf8"
TRUNCATED_LINE = "truncated_line"
NOT_AN_OBJECT = "wrong_type"
WRONG_FIELD_COUNT = "wrong_field_count"
INVALID_CSV = "invalid_csv"

FILE_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
COMPRESSIONS = (".gz", ".zst", ".bz2")
GLOB_CHARS = re.compile(r"[*?\[]")
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
BATCH_ROWS = 4096
CHUNK_CHARS = 1 << 20
FIRST_LINE_BYTES = 1 << 16  # how much of the first line format sniffing reads at most
MAX_RAW_CHARS = 1 << 20  # the quarantined tail of a JSON array that breaks off is cut to this
# A JSON string escape that can decode to a lone surrogate (\ud800-\udfff): valid JSON, invalid
# Unicode, and Arrow would refuse it later. Only rows with such an escape get the full check.
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
SURROGATE_ESCAPE_BYTES = re.compile(rb"\\u[dD][89a-fA-F]")
NON_SPACE = re.compile(r"\S")
UTF8_BOM = b"\xef\xbb\xbf"


class RawRow(NamedTuple):
    """One input row: `number` is 1-based (line in a JSONL file, element of a JSON array, row of a
    table). `text` is the row as read (bytes for an undecoded line), None for table rows, whose
    raw form is their JSON. `error` is (reason, message) when the row could not be parsed.
    Rows travel to worker processes in chunks: a NamedTuple pickles at a third of a dataclass's cost."""

    number: int
    value: dict[str, Any] | None
    text: str | bytes | None = None
    error: tuple[str, str] | None = None

    def parse(self) -> RawRow:
        return self

    def raw(self) -> str:
        if isinstance(self.text, bytes):
            return self.text.decode("utf-8", "backslashreplace").rstrip("\r\n")
        if self.text is not None:
            return printable(self.text)
        return json.dumps(self.value, ensure_ascii=False, default=str)


class JsonLine(NamedTuple):
    """A JSONL line, not parsed yet: parsing is CPU work, so it is done by `parse()` where the row
    is converted (a worker process), not where the file is read."""

    number: int
    line: bytes

    def parse(self) -> RawRow:
        """orjson first (4x faster on a good line); anything it refuses goes through the standard
        library, whose errors (and leniency: NaN, lone surrogates, huge ints) decide the reason."""
        try:
            value = orjson.loads(self.line)
        except orjson.JSONDecodeError:
            return self._parse_slowly()
        return RawRow(self.number, value, self.line) if isinstance(value, dict) else self._parse_slowly()

    def _parse_slowly(self) -> RawRow:
        number, line = self.number, self.line
        try:
            value = json.loads(line)
        except UnicodeDecodeError as exc:
            return RawRow(number, None, line, (INVALID_UTF8, f"line is not UTF-8: {exc.reason} at byte {exc.start}"))
        except json.JSONDecodeError as exc:
            cut = not line.endswith(b"\n") and _cut_short(exc)
            reason = TRUNCATED_LINE if cut else INVALID_JSON
            return RawRow(number, None, line, (reason, f"{exc.msg} at column {exc.colno}"))
        except RecursionError:
            return RawRow(number, None, line, (INVALID_JSON, NESTED_TOO_DEEPLY))
        if not isinstance(value, dict):
            problem = f"expected a JSON object per line, got {_json_kind(value)}"
            return RawRow(number, None, line, (NOT_AN_OBJECT, problem))
        if SURROGATE_ESCAPE_BYTES.search(line) and _lone_surrogate(value):
            return RawRow(number, None, line, (INVALID_UTF8, "a \\u escape decodes to a lone surrogate"))
        return RawRow(number, value, line)


Row = RawRow | JsonLine  # what readers yield; `row.parse()` gives the RawRow


@dataclass(frozen=True)
class Source:
    """One input. `name` goes into every record and quarantine line; `location` is the path or the
    Hub name; `kind` picks the reader."""

    name: str
    location: str
    kind: str  # jsonl | json | csv | parquet | saved | hub
    compression: str | None = None
    split: str | None = None

    def rows(self) -> Iterator[Row]:
        return READERS[self.kind](self)

    def has_line_ranges(self) -> bool:
        """Whether the file can be cut into line ranges: one JSON object per line, uncompressed
        (a compressed stream cannot be entered mid-way; an array has no line boundaries)."""
        if self.compression is not None:
            return False
        return self.kind == "jsonl" or (self.kind == "json" and not _is_json_array(self))

    @property
    def is_file(self) -> bool:
        """A file has one content hash; a dataset directory or a Hub dataset has none."""
        return self.kind not in ("saved", "hub")

    def describe(self, rows: int, sha256: str | None = None) -> InputFile:
        """The manifest's entry: content hash (`sha256`, when the caller has hashed the file
        already) and size for files."""
        if not self.is_file:
            location = self.location if self.split is None else f"{self.location}:{self.split}"
            return InputFile(path=location, rows=rows)
        return InputFile(path=self.location, sha256=sha256 or sha256_file(self.location),
                         bytes=os.path.getsize(self.location), rows=rows)


# ---------------------------------------------------------------- resolving RAW... into sources


def resolve_sources(specs: list[str], split: str | None = None) -> list[Source]:
    """Files, directories, globs, saved datasets and Hub names → sources, in the order given
    (directory and glob contents sorted), each file once."""
    found: list[tuple[str, str, str | None, str | None]] = []  # (location, kind, compression, split)
    for spec in specs:
        found.extend(_resolve_one(spec, split))
    # Each file once however it is spelled (./a.jsonl, a.jsonl, a link to it): read twice, its rows would count twice.
    unique, seen = [], set()
    for entry in found:
        key = (entry[0] if entry[1] == "hub" else os.path.realpath(entry[0]), *entry[1:])
        if key not in seen:
            seen.add(key)
            unique.append(entry)
    names = _display_names([loc for loc, kind, _, _ in unique if kind not in ("saved", "hub")])
    sources = []
    for location, kind, compression, part in unique:
        name = names.get(location, location)  # a Hub dataset is named by its Hub name
        if kind == "saved":
            name = Path(location).name + (f"/{part}" if part else "")
        sources.append(Source(name, location, kind, compression, part))
    return sources


def _resolve_one(spec: str, split: str | None) -> list[tuple[str, str, str | None, str | None]]:
    if GLOB_CHARS.search(spec):
        matches = sorted(glob.glob(spec, recursive=True))
        files = [f for m in matches for f in (_directory_files(m) if os.path.isdir(m) else [m]) if _file_kind(f)]
        if not files:
            raise UserError(f"{spec}: no .jsonl/.json/.csv/.parquet file matches this pattern")
        return [_file_entry(f) for f in files]
    if os.path.isdir(spec):
        if _is_saved_dataset(spec):
            return [(spec, "saved", None, part) for part in _saved_splits(spec, split)]
        if os.path.isfile(os.path.join(spec, MANIFEST_NAME)):
            return [_file_entry(f) for f in _stage_output_files(spec)]
        files = _directory_files(spec)
        if not files:
            raise UserError(f"{spec}: directory holds no .jsonl/.json/.csv/.parquet file (optionally .gz/.zst/.bz2)")
        return [_file_entry(f) for f in files]
    if os.path.exists(spec):
        if not _file_kind(spec):
            raise UserError(
                f"{spec}: unsupported file type; expected .jsonl, .json, .csv or .parquet (optionally .gz/.zst/.bz2)"
            )
        return [_file_entry(spec)]
    if _file_kind(spec) or not HUB_NAME.match(spec):
        raise UserError(f"{spec}: no such file or directory")
    return [(spec, "hub", None, split or "train")]


def _file_kind(path: str) -> tuple[str, str | None] | None:
    """(kind, compression) from the file name, or None for a file ingest does not read."""
    name = path.lower()
    compression = next((c for c in COMPRESSIONS if name.endswith(c)), None)
    if compression:
        name = name[: -len(compression)]
    kind = FILE_KINDS.get(os.path.splitext(name)[1])
    return (kind, compression) if kind else None


def _file_entry(path: str) -> tuple[str, str, str | None, None]:
    kind, compression = _file_kind(path)  # type: ignore[misc]  # callers only pass readable kinds
    return (path, kind, compression, None)


def _directory_files(directory: str) -> list[str]:
    files = []

    def fail(exc: OSError) -> None:
        raise UserError(f"{exc.filename}: cannot read directory ({exc.strerror}); check its permissions")

    for root, dirs, names in os.walk(directory, onerror=fail):
        # Hidden folders are never data: a killed stage's .tmp-* output, .git, caches.
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if MANIFEST_NAME in names:  # a stage's output inside the folder: its data, not its manifest
            dirs.clear()
            files.extend(_stage_output_files(root))
            continue
        files.extend(os.path.join(root, n) for n in sorted(names) if not n.startswith(".") and _file_kind(n))
    return files


# What a stage writes about the rows it refused: a listing for people, not data for the next stage.
REFUSED_ROW_FILES = (QUARANTINE_FILE, "dropped.parquet")


def _stage_output_files(directory: str) -> list[str]:
    """A prefdata stage's output read as the next stage reads it: the data files its manifest
    lists (a record set's records, the judge's judged.jsonl), not the manifest, quarantine or
    drop list beside them."""
    manifest = Manifest.read(directory)
    names = list(RECORD_FILES.get(manifest.stage, manifest.outputs))
    files = [os.path.join(directory, name) for name in names if name not in REFUSED_ROW_FILES and _file_kind(name)]
    if not files:
        raise UserError(f"{directory}: a prefdata {manifest.stage} output holds no rows ingest reads; pass a raw dump, "
                        "a record set or the judge's output")
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise UserError(f"{missing[0]}: listed in {os.path.join(directory, MANIFEST_NAME)} but missing; "
                        f"re-run prefdata {manifest.stage}")
    return files


def _is_saved_dataset(directory: str) -> bool:
    """A `datasets.save_to_disk` directory: a Dataset (state.json) or a DatasetDict (dataset_dict.json)."""
    return any(os.path.isfile(os.path.join(directory, f)) for f in ("state.json", "dataset_dict.json"))


def _saved_splits(directory: str, split: str | None) -> list[str | None]:
    dict_file = os.path.join(directory, "dataset_dict.json")
    if not os.path.isfile(dict_file):
        return [None]
    splits = json.loads(Path(dict_file).read_text(encoding="utf-8"))["splits"]
    if split is None:
        return splits
    if split not in splits:
        raise UserError(f"{directory}: no split '{split}'; it has {', '.join(splits)} (see --split)")
    return [split]


def _display_names(paths: list[str]) -> dict[str, str]:
    """A file's name in records: its base name, or its path below the common folder when two
    inputs share a base name (train.jsonl in two folders)."""
    base = [os.path.basename(p) for p in paths]
    if len(set(base)) == len(base):
        return dict(zip(paths, base))
    root = os.path.commonpath([os.path.abspath(p) for p in paths])
    root = root if os.path.isdir(root) else os.path.dirname(root)
    return {p: os.path.relpath(os.path.abspath(p), root) for p in paths}


# ---------------------------------------------------------------- opening files


@contextmanager
def _open_binary(source: Source) -> Iterator[IO[bytes]]:
    """The file's bytes, decompressed. A cut-off or corrupt compressed stream is a UserError:
    the rows after the damage cannot be counted, so the run must not look complete."""
    import zstandard

    try:
        if source.compression == ".gz":
            fh: IO[bytes] = gzip.open(source.location, "rb")
        elif source.compression == ".bz2":
            fh = bz2.open(source.location, "rb")
        elif source.compression == ".zst":
            fh = io.BufferedReader(_ZstdReader(source.location), buffer_size=1 << 20)
        else:
            fh = open(source.location, "rb")
    except OSError as exc:
        problem = exc.strerror or exc
        raise UserError(f"{source.location}: cannot open ({problem}); check the path and permissions") from None
    try:
        with fh:
            yield fh
    except (EOFError, zstandard.ZstdError, gzip.BadGzipFile) as exc:
        raise UserError(
            f"{source.location}: compressed data is corrupt or cut short ({exc}); re-download or re-compress it"
        ) from None
    except OSError as exc:
        if source.compression:  # bz2 reports bad data as a plain OSError
            raise UserError(f"{source.location}: cannot decompress ({exc}); re-download or re-compress it") from None
        raise


class _ZstdReader(io.RawIOBase):
    """A .zst file's bytes, every frame's. zstandard's own reader ends a frame cut short as if the
    file ended there; this one raises EOFError, so a truncated download is an error, not half a
    file. Compressed bytes go in SLICE at a time, which bounds what one call holds decompressed
    (zstd expands at most ~32,000:1, so 128 MiB)."""

    SLICE = 4 << 10

    def __init__(self, path: str) -> None:
        import zstandard

        self._file = open(path, "rb")
        self._decompressor = zstandard.ZstdDecompressor()
        self._frame: Any = None  # the current frame's decompression object
        self._compressed, self._in = b"", 0  # read from the file, not decompressed yet
        self._out, self._at = b"", 0  # decompressed, not handed out yet

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._at == len(self._out):
            if self._in == len(self._compressed):
                self._compressed, self._in = self._file.read(1 << 20), 0
                if not self._compressed:
                    if self._frame is not None and not self._frame.eof:
                        raise EOFError("the file ends inside a zstd frame")
                    return 0
            if self._frame is None or self._frame.eof:  # concatenated frames: each needs its own object
                self._frame = self._decompressor.decompressobj()
            piece = self._compressed[self._in:self._in + self.SLICE]
            self._out, self._at = self._frame.decompress(piece), 0
            # A frame that ended inside the slice leaves the rest for the next frame.
            self._in += len(piece) - (len(self._frame.unused_data) if self._frame.eof else 0)
        size = min(len(buffer), len(self._out) - self._at)
        buffer[:size] = self._out[self._at:self._at + size]
        self._at += size
        return size

    def close(self) -> None:
        self._file.close()
        super().close()


def _open_text(fh: IO[bytes]) -> io.TextIOWrapper:
    """Text with a leading BOM dropped; undecodable bytes kept as surrogates so one bad row does
    not stop the file (`_bad_unicode` finds them)."""
    return io.TextIOWrapper(fh, encoding="utf-8-sig", errors="surrogateescape", newline="")


def printable(text: str) -> str:
    """Text read with surrogateescape, its undecodable bytes shown as `\\xNN` (writable as UTF-8)."""
    if not _bad_unicode(text):
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _bad_unicode(text: str) -> bool:
    """Whether `text` holds surrogates (undecodable bytes, or lone surrogate escapes decoded)."""
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _lone_surrogate(value: Any) -> bool:
    return _bad_unicode(json.dumps(value, ensure_ascii=False))


# ---------------------------------------------------------------- JSON


def _json_rows(source: Source) -> Iterator[Row]:
    array = _is_json_array(source)
    with _open_binary(source) as fh:
        yield from _json_array_rows(_open_text(fh)) if array else _json_line_rows(fh)


def _jsonl_rows(source: Source) -> Iterator[Row]:
    with _open_binary(source) as fh:
        yield from _json_line_rows(fh)


def _is_json_array(source: Source) -> bool:
    """Whether the file is one JSON array: its first non-blank character is '[', unless its first
    line is a whole JSON value with more lines after it (JSON lines whose first row is an array)."""
    with _open_binary(source) as fh:
        line = fh.readline(FIRST_LINE_BYTES).removeprefix(UTF8_BOM)
        while line and line.isspace():
            line = fh.readline(FIRST_LINE_BYTES)
        if line.lstrip()[:1] != b"[":
            return False
        if not line.endswith(b"\n"):
            return True  # the only line, or a long one: an array on one line
        try:
            json.loads(line)
        except (ValueError, RecursionError):
            return True  # the array goes on over the next lines (or nests past the parser: its reader says so)
        return not any(chunk.strip() for chunk in iter(lambda: fh.read(1 << 16), b""))


def _json_line_rows(fh: IO[bytes], first_line: int = 1) -> Iterator[JsonLine]:
    """One JSON object per line; blank lines are not rows (but keep the line numbers right)."""
    for number, line in enumerate(fh, first_line):
        if number == 1 and line.startswith(UTF8_BOM):
            line = line[len(UTF8_BOM):]
        if not line.isspace():
            yield JsonLine(number, line)


class LineRange(NamedTuple):
    """Whole lines of a file: bytes [start, end), the first of them line `first_line`."""

    start: int
    end: int
    first_line: int


def line_ranges(source: Source, range_bytes: int) -> Iterator[LineRange]:
    """The file cut into ranges of about `range_bytes`, each cut just after a newline, so no line
    is split. Each range's first line number comes from counting the newlines before it (a
    memchr pass over one block at a time: the lines themselves are read by the workers)."""
    with _open_binary(source) as fh:
        start, first_line = 0, 1
        while block := fh.read(range_bytes):
            rest_of_line = b"" if block.endswith(b"\n") else fh.readline()
            end = start + len(block) + len(rest_of_line)
            yield LineRange(start, end, first_line)
            first_line += block.count(b"\n") + rest_of_line.count(b"\n")
            start = end


def range_rows(source: Source, lines: LineRange) -> Iterator[JsonLine]:
    """The rows of one line range, read from the file by the process that converts them."""
    with _open_binary(source) as fh:
        data = os.pread(fh.fileno(), lines.end - lines.start, lines.start)
    yield from _json_line_rows(io.BytesIO(data), lines.first_line)


def _cut_short(exc: json.JSONDecodeError) -> bool:
    """Whether the parser ran out of text (a cut-off value) rather than met a wrong character."""
    return exc.msg.startswith("Unterminated string") or exc.pos >= len(exc.doc.rstrip())


def _may_continue(exc: json.JSONDecodeError) -> bool:
    """Whether more text could still make the value parse: the error lies in the last few
    characters of the buffer (a literal, escape or number cut by the chunk boundary)."""
    return exc.msg.startswith("Unterminated string") or exc.pos >= len(exc.doc) - 8


def _json_kind(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


class _TextBuffer:
    """A sliding window over a text stream for the array reader."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream, self.text, self.pos, self.eof = stream, "", 0, False

    def more(self) -> bool:
        chunk = self.stream.read(CHUNK_CHARS)
        if not chunk:
            self.eof = True
            return False
        self.text = self.text[self.pos:] + chunk
        self.pos = 0
        return True

    def next_char(self) -> str | None:
        """The next non-blank character (position left on it), or None at the end."""
        while True:
            found = NON_SPACE.search(self.text, self.pos)
            if found:
                self.pos = found.start()
                return self.text[self.pos]
            self.pos = len(self.text)
            if not self.more():
                return None

    def rest(self) -> str:
        """What is left, up to MAX_RAW_CHARS (for the quarantine line of a broken array)."""
        while len(self.text) - self.pos < MAX_RAW_CHARS and self.more():
            pass
        return self.text[self.pos: self.pos + MAX_RAW_CHARS]


def _json_array_rows(stream: IO[str]) -> Iterator[RawRow]:
    """Elements of one top-level JSON array, decoded one at a time with `raw_decode` over a
    sliding buffer. After a broken element the array has no reliable next element, so the rest of
    the file becomes one quarantined row (its text cut to MAX_RAW_CHARS)."""
    decoder = json.JSONDecoder()
    buf = _TextBuffer(stream)
    buf.next_char()
    buf.pos += 1  # the opening '['
    number = 0
    while True:
        char = buf.next_char()
        if char == "]":
            buf.pos += 1
            if buf.next_char() is not None:
                yield RawRow(number + 1, None, buf.rest(), (INVALID_JSON, "text after the closing ']' of the array"))
            return
        if char is None:  # rows after the last whole element may be missing: say so
            yield RawRow(number + 1, None, "", (TRUNCATED_LINE, "the file ends before the array's closing ']'"))
            return
        if number:
            if char != ",":
                problem = f"expected ',' between array elements, got {char!r}; rest of the file skipped"
                yield RawRow(number + 1, None, buf.rest(), (INVALID_JSON, problem))
                return
            buf.pos += 1
            buf.next_char()
        number += 1
        while True:
            try:
                value, end = decoder.raw_decode(buf.text, buf.pos)
                break
            except json.JSONDecodeError as exc:
                if _may_continue(exc) and buf.more():
                    continue
                reason = TRUNCATED_LINE if buf.eof and _cut_short(exc) else INVALID_JSON
                problem = f"array element {number}: {exc.msg}; rest of the file skipped"
                yield RawRow(number, None, buf.rest(), (reason, problem))
                return
            except RecursionError:  # where the element ends is not known either
                yield RawRow(number, None, buf.rest(), (INVALID_JSON, f"array element {number}: {NESTED_TOO_DEEPLY}; "
                                                        "rest of the file skipped"))
                return
        raw = buf.text[buf.pos:end]
        buf.pos = end
        if not isinstance(value, dict):
            problem = f"expected an object per array element, got {_json_kind(value)}"
            yield RawRow(number, None, raw, (NOT_AN_OBJECT, problem))
        elif _bad_unicode(raw) or (SURROGATE_ESCAPE.search(raw) and _lone_surrogate(value)):
            yield RawRow(number, None, raw, (INVALID_UTF8, "element is not valid UTF-8 text"))
        else:
            yield RawRow(number, value, raw)


# ---------------------------------------------------------------- CSV, parquet, datasets


def _csv_rows(source: Source) -> Iterator[RawRow]:
    """Rows of a CSV file with a header line, as {column: text}; `number` is the data row."""
    csv.field_size_limit(2**31 - 1)  # answers run long; the default 128 KiB limit is for safety, not data
    with _open_binary(source) as fh:
        reader = csv.reader(_open_text(fh))
        header = next(reader, None)
        if header is None:
            return
        if repeated := sorted({name for name in header if name and header.count(name) > 1}):  # '': a spreadsheet's trailing commas
            raise UserError(f"{source.location}: the header names {', '.join(map(repr, repeated))} more than once, so "
                            "one of the columns would be lost; rename them")
        number = 0
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                number += 1
                yield RawRow(number, None, f"(line {reader.line_num})", (INVALID_CSV, str(exc)))
                continue
            if not fields:
                continue  # a blank line
            number += 1
            if len(fields) != len(header):
                problem = f"{len(fields)} fields, the header has {len(header)}"
                yield RawRow(number, None, json.dumps(fields, ensure_ascii=False), (WRONG_FIELD_COUNT, problem))
            elif any(_bad_unicode(f) for f in fields):
                raw = json.dumps([printable(f) for f in fields], ensure_ascii=False)
                yield RawRow(number, None, raw, (INVALID_UTF8, "row is not valid UTF-8 text"))
            else:
                yield RawRow(number, dict(zip(header, fields)))


def _parquet_rows(source: Source) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    with _seekable(source) as path:
        try:
            parquet = pq.ParquetFile(path)
        except (OSError, ValueError) as exc:  # ArrowInvalid is a ValueError
            raise UserError(f"{source.location}: not a readable parquet file ({exc})") from None
        with parquet:
            yield from _table_rows(parquet.iter_batches(batch_size=BATCH_ROWS))


@contextmanager
def _seekable(source: Source) -> Iterator[str]:
    """Parquet needs random access: a compressed one is decompressed to a temporary file first."""
    if not source.compression:
        yield source.location
        return
    with tempfile.TemporaryDirectory(prefix="prefdata-parquet-") as tmp:
        path = os.path.join(tmp, "data.parquet")
        with _open_binary(source) as fh, open(path, "wb") as out:
            shutil.copyfileobj(fh, out, 1 << 20)
        yield path


def _table_rows(batches: Any) -> Iterator[RawRow]:
    number = 0
    for batch in batches:
        for value in batch.to_pylist():
            number += 1
            yield RawRow(number, value)


def _saved_rows(source: Source) -> Iterator[RawRow]:
    import datasets

    path = source.location if source.split is None else os.path.join(source.location, source.split)
    try:
        dataset = datasets.load_from_disk(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable `save_to_disk` dataset ({exc})") from None
    yield from _table_rows(dataset.with_format("arrow").iter(batch_size=BATCH_ROWS))


def _hub_rows(source: Source) -> Iterator[RawRow]:
    """A Hub dataset, streamed (nothing is stored first). Offline, or for an unknown name, the
    loader fails before the first row; that is the user's one-line error."""
    import datasets

    try:
        dataset = datasets.load_dataset(source.location, split=source.split, streaming=True)
        rows = iter(dataset)
        first = next(rows, None)
    except (OSError, ValueError) as exc:  # ConnectionError, DatasetNotFoundError, bad split…
        raise UserError(
            f"{source.location}: not a local file or directory, and the Hub dataset could not be loaded "
            f"({first_line(exc)}); pass a local path, or go online (HF_HUB_OFFLINE=0)"
        ) from None
    if first is None:
        return
    yield RawRow(1, first)
    for number, value in enumerate(rows, 2):
        yield RawRow(number, value)


READERS = {
    "jsonl": _jsonl_rows, "json": _json_rows, "csv": _csv_rows, "parquet": _parquet_rows,
    "saved": _saved_rows, "hub": _hub_rows,
}
