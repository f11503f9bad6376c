"""The trainer's view of a shard directory: token columns and stored reference log-probs per split.

Shards are checked against their manifest (present, same sha256) before anything trains on them,
and a run that needs the reference terms refuses shards that do not carry them, with the command
that adds them.
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
from schemas.shard import REF_COLUMNS
from train.batching import TokenColumns


@dataclass(frozen=True)
class SplitData:
    ids: np.ndarray  # record ids (str), for error messages and eval outputs
    columns: TokenColumns
    ref_chosen_logps: np.ndarray | None  # float32 [N]
    ref_rejected_logps: np.ndarray | None

    def __len__(self) -> int:
        return len(self.columns)

    def ref_logps(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.ref_chosen_logps[rows], self.ref_rejected_logps[rows]


def _read(path: Path) -> pa.Table:
    # Memory-mapped: the OS pages the file in as batches touch it instead of reading it up front.
    return ipc.open_file(pa.memory_map(str(path))).read_all()


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
        tables.append(_read(path))
    table = pa.concat_tables(tables, promote_options="none") if len(tables) > 1 else tables[0]
    has_ref = all(name in table.column_names for name in REF_COLUMNS)
    if need_ref and not has_ref:
        raise UserError(
            f"{shards_dir}: no reference log-probs in the shards; run `prefdata precompute-ref {shards_dir} --model MODEL` "
            "first (or train with --reference live, or --objective sft)"
        )
    ref = [table.column(name).to_numpy().astype(np.float32) for name in REF_COLUMNS] if has_ref else [None, None]
    return SplitData(np.asarray(table.column("id").to_pylist(), dtype=object), TokenColumns.from_table(table), *ref)


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
