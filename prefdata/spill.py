"""Curate's disk side: spill files and the bucket sort that keep its memory bounded by
`chunk_rows` (docs/curate.md, "Curate at scale"). Nothing here decides anything about a record.

- `IpcSpill`: an Arrow IPC file of record batches written once and read back batch by batch
  (pass 1's prompt comparison texts, the near-duplicate step's texts by node, the bucket sort's
  pieces). Spill files live under the output's temporary directory, so a failed run never leaves
  them beside a finished output.
- `bucket_sort`: tables carrying an int64 `row` column, in any order, back in `row` order with at
  most one bucket of rows in memory (pass 2 when the inputs are not already in output order).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


class IpcSpill:
    """Arrow IPC file of record batches on the spill disk; read back batch by batch, not mapped."""

    def __init__(self, path: Path) -> None:
        self.path, self._writer, self._sink = path, None, None

    def write(self, table: pa.Table) -> None:
        if self._writer is None:
            self._sink = pa.OSFile(str(self.path), "wb")
            self._writer = pa.ipc.new_file(self._sink, table.schema)
        self._writer.write_table(table)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()

    def batches(self) -> Iterator[pa.RecordBatch]:
        if self._writer is None:
            return
        with pa.OSFile(str(self.path), "rb") as source:
            reader = pa.ipc.open_file(source)
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)


def bucket_sort(chunks: Iterator[pa.Table], n_rows: int, bucket_rows: int, spill: Path) -> Iterator[pa.Table]:
    """Tables in any row order (rows 0..n_rows-1, each once, in the int64 column `row`) → tables
    in row order, `bucket_rows` rows at a time, written under the directory `spill`. Each chunk is
    sorted and written to disk as one record batch per bucket of rows it touches; then each
    bucket's pieces are read back from every chunk file, sorted and yielded."""
    pieces: list[tuple[IpcSpill, dict[int, int]]] = []  # per chunk file: bucket → batch number
    for i, table in enumerate(chunks):
        table = table.take(pc.sort_indices(table.column("row")))
        rows = table.column("row").to_numpy()
        buckets = rows // bucket_rows
        starts = np.flatnonzero(np.r_[True, buckets[1:] != buckets[:-1]])
        file, index = IpcSpill(spill / f"rows-{i:06d}.arrow"), {}
        for number, (lo, hi) in enumerate(zip(starts, np.r_[starts[1:], len(rows)])):
            file.write(table.slice(lo, hi - lo))
            index[int(buckets[lo])] = number
        file.close()
        pieces.append((file, index))
    for bucket in range((n_rows + bucket_rows - 1) // bucket_rows):
        parts = [_read_batch(file, index[bucket]) for file, index in pieces if bucket in index]
        if parts:
            table = pa.Table.from_batches(parts)
            yield table.take(pc.sort_indices(table.column("row")))


def _read_batch(spill: IpcSpill, number: int) -> pa.RecordBatch:
    with pa.OSFile(str(spill.path), "rb") as source:
        return pa.ipc.open_file(source).get_batch(number)
