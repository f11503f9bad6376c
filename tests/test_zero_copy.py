"""Shards are used as views of the memory-mapped files (issue 13, item 4): opening a large shard
set does not copy its token columns into the process, and batches built from the views equal
batches built from a plain copied, single-chunk table."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from schemas.io import sha256_file
from schemas.manifest import Counts, Manifest, ShardFile
from schemas.shard import SHARD_WITH_REF_SCHEMA, shard_name
from train.batching import TokenColumns, collate_pairs
from train.data import open_shards

ROOT = Path(__file__).resolve().parents[1]


def _list_column(rng: np.random.Generator, rows: int, lo: int, hi: int, vocab: int) -> pa.ListArray:
    lengths = rng.integers(lo, hi, rows, dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int32)]).astype(np.int32)
    values = rng.integers(0, vocab, int(offsets[-1]), dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def _write_shard_set(out: Path, files: int, rows: int, lengths: tuple[int, int], batch_rows: int,
                     seed: int = 0, vocab: int = 32_000) -> int:
    """`files` train shards of `rows` rows, each written as several record batches (chunks), and
    their manifest; returns the bytes of token ids written."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    shards, token_bytes = [], 0
    for f in range(files):
        tokens = [_list_column(rng, rows, *lengths, vocab) for _ in range(3)]
        token_bytes += sum(4 * len(t.values) for t in tokens)
        ids = pa.array([f"r{f}-{i}" for i in range(rows)])
        table = pa.Table.from_arrays(
            [ids, ids, *tokens, pa.array(rng.normal(-50, 5, rows).astype(np.float32)),
             pa.array(rng.normal(-60, 5, rows).astype(np.float32))], schema=SHARD_WITH_REF_SCHEMA)
        name = shard_name("train", f)
        with ipc.new_file(out / name, SHARD_WITH_REF_SCHEMA) as writer:
            writer.write_table(table, max_chunksize=batch_rows)
        shards.append(ShardFile(name=name, split="train", rows=rows, sha256=sha256_file(out / name)))
        del table, tokens
    total = files * rows
    Manifest(stage="precompute-ref", package_version="test", config={}, counts=Counts(read=total, kept=total),
             shards=shards).write(out)
    return token_bytes


# ---------------------------------------------------------------------------------------------
# views equal copies


def _copied_columns(shards: Path) -> tuple[TokenColumns, pa.Table]:
    """The pre-view path: every file read in full, concatenated, combined into one chunk."""
    tables = [ipc.open_file(str(p)).read_all() for p in sorted(shards.glob("train-*.arrow"))]
    table = pa.concat_tables(tables).combine_chunks()
    assert all(table.column(n).num_chunks == 1 for n in table.column_names)
    return TokenColumns.from_table(table), table


def test_batches_from_views_equal_batches_from_a_copied_table(tmp_path):
    _write_shard_set(tmp_path, files=3, rows=50, lengths=(1, 9), batch_rows=16)
    _, data, _ = open_shards(tmp_path, need_ref=True)
    assert data.columns.prompt.index.starts.tolist() == [0, 16, 32, 48, 50, 66, 82, 98, 100, 116, 132, 148, 150]
    copied, table = _copied_columns(tmp_path)
    assert len(data) == len(copied) == 150
    np.testing.assert_array_equal(data.columns.pair_lengths, copied.pair_lengths)
    np.testing.assert_array_equal(data.columns.real_tokens, copied.real_tokens)
    assert data.columns.max_token_id == copied.max_token_id
    rng = np.random.default_rng(1)
    # Batches across chunk and file boundaries, the first and last row included.
    for rows in [np.array([0, 149]), np.array([15, 16, 49, 50, 99, 100]), *(rng.permutation(150)[:8] for _ in range(10))]:
        view, copy = collate_pairs(data.columns, rows, pad_id=3), collate_pairs(copied, rows, pad_id=3)
        for name in ("input_ids", "attention_mask", "completion_mask"):
            assert getattr(view, name).equal(getattr(copy, name)), name
        chosen, rejected = data.ref_logps(rows)
        np.testing.assert_array_equal(chosen, table.column("ref_chosen_logps").to_numpy()[rows])
        np.testing.assert_array_equal(rejected, table.column("ref_rejected_logps").to_numpy()[rows])
        assert data.ids[rows] == [table.column("id")[int(r)].as_py() for r in rows]
    assert data.ids[149] == "r2-49" and len(data.ids) == 150 and list(data.ids)[50] == "r1-0"


def _mapped_ranges(paths: list[Path]) -> list[tuple[int, int]]:
    """Address ranges where this process has `paths` memory-mapped (/proc/self/maps)."""
    names = {str(p.resolve()) for p in paths}
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] in names:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((lo, hi))
    return ranges


def test_token_and_ref_views_point_into_the_mapped_files(tmp_path):
    _write_shard_set(tmp_path, files=2, rows=20, lengths=(1, 5), batch_rows=8)
    _, data, _ = open_shards(tmp_path, need_ref=True)
    ranges = _mapped_ranges(sorted(tmp_path.glob("train-*.arrow")))
    assert ranges
    inside = lambda a: any(lo <= a.ctypes.data and a.ctypes.data + a.nbytes <= hi for lo, hi in ranges)  # noqa: E731
    columns = data.columns
    views = [*columns.prompt.values, *columns.chosen.values, *columns.rejected.values, *columns.chosen.offsets,
             *data.ref_chosen_logps._chunks]
    assert len(columns.chosen.values) == 6  # 2 files x 3 record batches, none combined
    assert all(inside(v) for v in views)
    assert not inside(np.array(columns.chosen.values[0]))  # a copy is not: the check can fail


def test_row_and_ref_lookups_out_of_range_fail(tmp_path):
    _write_shard_set(tmp_path, files=1, rows=5, lengths=(1, 3), batch_rows=2)
    _, data, _ = open_shards(tmp_path, need_ref=True)
    with pytest.raises(IndexError):
        data.columns.prompt.row(5)
    with pytest.raises(IndexError):
        data.ref_logps(np.array([0, 5]))
    with pytest.raises(ValueError):  # cached arrays are shared: read-only
        data.columns.pair_lengths[0] = 1


# ---------------------------------------------------------------------------------------------
# memory

_MEASURE = textwrap.dedent("""
    import json, sys
    import numpy as np
    import pyarrow as pa
    from train.batching import collate_pairs
    from train.data import open_shards

    def status():
        fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "RssAnon", "RssFile")}

    # Warm-up on a tiny set: lazy imports and allocator arenas are paid once, not per byte.
    open_shards(sys.argv[2], need_ref=True)[1].columns.max_token_id
    out = {"before": status()}
    manifest, data, _ = open_shards(sys.argv[1], need_ref=True)
    out["opened"] = status()
    # Touch every token and every reference value, and build batches: pages come in from the
    # page cache (RssFile, shared by every process), never into the process's own memory.
    out["max_token_id"] = data.columns.max_token_id
    rows = np.arange(len(data))
    out["ref_sum"] = float(sum(x.sum(dtype=np.float64) for x in data.ref_logps(rows)))
    for start in range(0, len(data), len(data) // 8):
        collate_pairs(data.columns, rows[start:start + 64], pad_id=0)
    out["touched"] = status()
    # Control: the old path's copy (combine_chunks of each column) must show in RssAnon, or
    # this measurement could not see a copy at all.
    table = pa.concat_tables([pa.ipc.open_file(pa.memory_map(sys.argv[1] + "/" + s.name)).read_all()
                              for s in manifest.shards])
    copies = [table.column(n).combine_chunks() for n in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")]
    out["copied"] = status()
    print(json.dumps(out))
""")


def test_opening_a_large_shard_set_does_not_copy_it_into_the_process(tmp_path):
    # ~380 MB of token ids over 8 files of 4 record batches each.
    data_bytes = _write_shard_set(tmp_path / "large", files=8, rows=40_000, lengths=(50, 150), batch_rows=10_000)
    _write_shard_set(tmp_path / "small", files=2, rows=10, lengths=(1, 5), batch_rows=4)
    try:
        assert data_bytes > 300e6
        result = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path / "large"), str(tmp_path / "small")],
                                cwd=ROOT, capture_output=True,
                                text=True, check=True, timeout=600)
    finally:
        for path in tmp_path.glob("*/*.arrow"):
            path.unlink()
    m = json.loads(result.stdout)
    grew = lambda stage, key: m[stage][key] - m["before"][key]  # noqa: E731
    print({stage: {k: f"{v / 1e6:.0f} MB" for k, v in m[stage].items()} for stage in ("before", "opened", "touched", "copied")},
          f"data {data_bytes / 1e6:.0f} MB")
    assert grew("opened", "VmRSS") < 0.1 * data_bytes
    assert grew("touched", "RssAnon") < 0.1 * data_bytes
    assert grew("copied", "RssAnon") > 0.9 * data_bytes  # the measurement sees a copy when there is one
    assert m["max_token_id"] < 32_000
