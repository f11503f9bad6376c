"""The trainer's view of a shard directory: token columns and stored reference log-probs per split.

Shards are checked against their manifest (present, same sha256) before anything trains on them,
and a run that needs the reference terms refuses shards that do not carry them, with the command
that adds them.

Nothing here copies a column: the shard files are memory-mapped, the tables of a split's files
are chained (not concatenated), token ids and reference log-probs are numpy views of the mapped
buffers, and record ids are decoded only for the rows an error message names. A process's memory
therefore grows with the rows it touches per step, not with the shard set, and every torchrun
rank on a machine shares one page-cache copy of the files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from schemas.errors import UserError
from schemas.io import sha256_file
from schemas.manifest import Manifest
from schemas.shard import PAIRED, REF_COLUMNS_OF, UNPAIRED, shard_kind
from train.batching import ChunkIndex, TokenColumns


class RecordIds:
    """The split's record ids, left in Arrow: a numpy array of Python strings would cost ~80 bytes
    a row in every process. `ids[rows]` decodes just those rows (error messages, eval outputs)."""

    def __init__(self, column: pa.ChunkedArray) -> None:
        self._column = column

    def __len__(self) -> int:
        return len(self._column)

    def __getitem__(self, rows: int | np.integer | np.ndarray | list[int]) -> str | list[str]:
        if isinstance(rows, (int, np.integer)):
            return self._column[int(rows)].as_py()
        return self._column.take(pa.array(np.asarray(rows, dtype=np.int64))).to_pylist()

    def __iter__(self):
        for chunk in self._column.chunks:
            yield from chunk.to_pylist()

    @property
    def column(self) -> pa.ChunkedArray:
        return self._column


class FloatColumn:
    """A float32 column as per-chunk views of the mapped buffers; `take` gathers rows over chunks."""

    def __init__(self, column: pa.ChunkedArray) -> None:
        chunks = column.chunks
        # A float32 column without nulls is a view; anything else is a shard we did not write.
        self._chunks = [c.to_numpy(zero_copy_only=True) for c in chunks]
        if any(c.dtype != np.float32 for c in self._chunks):
            raise ValueError(f"expected float32 reference log-probs, got {column.type}")
        self._index = ChunkIndex([len(c) for c in chunks])

    def __len__(self) -> int:
        return len(self._index)

    def take(self, rows: np.ndarray) -> np.ndarray:
        chunk, local = self._index.locate_many(rows)
        out = np.empty(len(local), dtype=np.float32)
        for c in np.unique(chunk):
            hit = chunk == c
            out[hit] = self._chunks[c][local[hit]]
        return out


@dataclass(frozen=True, eq=False)
class SplitData:
    ids: RecordIds  # record ids, for error messages and eval outputs
    columns: TokenColumns
    ref_chosen_logps: FloatColumn | None
    ref_rejected_logps: FloatColumn | None
    score_margins: np.ndarray | None = None  # float32 [N], reward models' --margin-from-scores (train.rewards)
    labels: np.ndarray | None = None  # bool [N], unpaired shards only: True where the completion is desirable

    def __len__(self) -> int:
        return len(self.columns)

    @property
    def kind(self) -> str:
        return PAIRED if self.labels is None else UNPAIRED

    def ref_logps(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stored reference log-probs of `rows`' two continuations (a pair's chosen and rejected, an
        unpaired row's completion and KL completion), float32 copies of just those rows."""
        if self.ref_chosen_logps is None or self.ref_rejected_logps is None:
            raise ValueError("these shards carry no reference log-probs")
        return self.ref_chosen_logps.take(rows), self.ref_rejected_logps.take(rows)


def read_shard(path: Path) -> pa.Table:
    """A shard file, with or without reference log-probs; anything else is a UserError."""
    # Memory-mapped: the OS pages the file in as batches touch it instead of reading it up front,
    # and the table's buffers point into the mapping (they keep it alive after this returns).
    table = ipc.open_file(pa.memory_map(str(path))).read_all()
    if shard_kind(table.schema) is None:
        raise UserError(f"{path}: not a prefdata shard (columns {table.column_names}); re-run prefdata tokenize")
    return table


def load_split(shards_dir: Path, manifest: Manifest, split: str, need_ref: bool) -> SplitData | None:
    files = [s for s in manifest.shards if s.split == split]
    if not files:
        return None
    tables = []
    for shard in files:
        path = shards_dir / shard.name
        if not path.is_file():
            raise UserError(f"{path}: listed in the manifest but missing; re-run prefdata tokenize")
        if sha256_file(path) != shard.sha256:
            raise UserError(f"{path}: sha256 differs from the manifest (changed, truncated or half-written); "
                            f"re-run prefdata {manifest.stage}")
        tables.append(read_shard(path))
    # Without promotion, concat_tables only chains the files' chunks: no buffer is copied.
    if len({shard_kind(t.schema) for t in tables}) > 1:
        raise UserError(f"{shards_dir}: the {split} shards mix paired and unpaired rows; re-run prefdata tokenize")
    table = pa.concat_tables(tables, promote_options="none") if len(tables) > 1 else tables[0]
    kind = shard_kind(table.schema)
    has_ref = all(name in table.column_names for name in REF_COLUMNS_OF[kind])
    if need_ref and not has_ref:
        raise UserError(
            f"{shards_dir}: no reference log-probs in the shards; run `prefdata precompute-ref {shards_dir} --model MODEL` "
            "first (or train with --reference live, or --objective sft)"
        )
    ref = [FloatColumn(table.column(name)) for name in REF_COLUMNS_OF[kind]] if has_ref else [None, None]
    # One byte a row, decoded once: the loss reads the labels of every batch.
    labels = table.column("label").to_numpy() if kind == UNPAIRED else None
    return SplitData(RecordIds(table.column("id")), TokenColumns.from_table(table), *ref, labels=labels)


def shards_kind(shards_dir: str | Path) -> str | None:
    """`paired` or `unpaired`, from the schema of the directory's first shard (None: no readable one)."""
    shards_dir = Path(shards_dir)
    manifest = Manifest.read(shards_dir, stages=("tokenize", "precompute-ref"))
    first = shards_dir / manifest.shards[0].name if manifest.shards else None
    if first is None or not first.is_file():
        return None
    return shard_kind(ipc.open_file(pa.memory_map(str(first))).schema)


def open_shards(shards_dir: str | Path, need_ref: bool) -> tuple[Manifest, SplitData, SplitData | None]:
    """(manifest, train split, eval split or None)."""
    shards_dir = Path(shards_dir)
    manifest = Manifest.read(shards_dir, stages=("tokenize", "precompute-ref"))
    if need_ref and manifest.stage != "precompute-ref":
        raise UserError(
            f"{shards_dir}: made by prefdata tokenize, without reference log-probs; run `prefdata precompute-ref "
            f"{shards_dir} --model MODEL` first (or train with --reference live, or --objective sft)"
        )
    train = load_split(shards_dir, manifest, "train", need_ref)
    if train is None or len(train) == 0:
        raise UserError(f"{shards_dir}: no training rows (no train-*.arrow shard); check the curate/tokenize output")
    return manifest, train, load_split(shards_dir, manifest, "eval", need_ref)
