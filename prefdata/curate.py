"""Stage 2: record sets → train / eval record sets a careful team would trust.

Order of the steps (each reported in the manifest):
  1. load every input, sort by (source, source_row, id) so nothing depends on input order;
  2. degenerate pairs: identical after normalisation, empty answer, tied scores, score margin
     below --min-margin, answers outside --min-chars / --max-chars;
  3. exact duplicates of the whole normalised pair: the first by (source, source_row) is kept;
  4. decontamination against evaluation sets (shared word n-grams);
  5. near-duplicate prompt clusters (prefdata.neardup: word 1+2-grams with a length-adapted
     threshold for short prompts, word n-grams for long ones; MinHash LSH) and --max-pairs-per-prompt;
  6. split by a hash of the prompt cluster, so a cluster never straddles train and eval.
Normalisation for comparisons is NFKC, case-folded, whitespace collapsed; the records themselves
are written unchanged.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from prefdata import __version__
from prefdata.neardup import components, prompt_clusters, shares_shingle, shingles
from schemas.errors import UserError
from schemas.io import atomic_dir, sha256_file
from schemas.manifest import Counts, InputFile, Manifest
from schemas.records import RECORD_FILES, RECORD_SCHEMA

# train/eval.parquet are records plus the prompt cluster they were split by; a later curate run
# over them keeps those clusters whole.
CURATED_SCHEMA = RECORD_SCHEMA.append(pa.field("prompt_cluster", pa.string()))
DROPPED_SCHEMA = CURATED_SCHEMA.append(pa.field("drop_reason", pa.string())).append(pa.field("duplicate_of", pa.string()))
CURATED_COLUMNS = CURATED_SCHEMA.names


class CurateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: list[str]
    out: str
    near_dup: bool = True
    ngram: int = Field(5, gt=0)
    threshold: float = Field(0.8, gt=0, le=1)
    num_perm: int = Field(128, ge=8, le=1024)
    max_pairs_per_prompt: int | None = Field(None, gt=0)
    min_margin: float | None = None
    min_chars: int = Field(1, ge=0)
    max_chars: int | None = Field(None, gt=0)
    decontaminate: list[str] = []
    decontaminate_ngram: int = Field(13, gt=0)
    eval_fraction: float = Field(0.02, ge=0, lt=1)
    seed: int = 0


# ---------------------------------------------------------------------------------------------
# Loading


def _load_inputs(paths: list[str]) -> tuple[pl.DataFrame, list[InputFile]]:
    frames, inputs = [], []
    for directory in map(Path, paths):
        manifest = Manifest.read(directory, stages=tuple(RECORD_FILES))
        for name in RECORD_FILES[manifest.stage]:
            path = directory / name
            if not path.is_file():
                raise UserError(f"{path} missing; re-run prefdata {manifest.stage} for {directory}")
            table = pq.read_table(path)
            if not all(field in table.schema for field in RECORD_SCHEMA):
                raise UserError(f"{path}: not a prefdata record set (columns {table.schema.names}); re-run prefdata {manifest.stage}")
            if "prompt_cluster" not in table.schema.names:
                table = table.append_column("prompt_cluster", pa.nulls(table.num_rows, pa.string()))
            frames.append(pl.from_arrow(table.select(CURATED_COLUMNS)))
            inputs.append(InputFile(path=str(path), sha256=sha256_file(path), bytes=path.stat().st_size, rows=table.num_rows))
    if not frames:
        raise UserError("no input record sets given")
    records = pl.concat(frames).sort(["source", "source_row", "id"]).with_row_index("row")
    return records, inputs


def _fold(text: pl.Expr) -> pl.Expr:
    """The form texts are compared in: NFKC, case-folded, whitespace collapsed."""
    return text.str.normalize("NFKC").str.to_lowercase().str.replace_all(r"\s+", " ").str.strip_chars()


def _normalised(messages: str) -> pl.Expr:
    """One comparable string per message list, roles kept."""
    element = pl.element().struct
    return _fold(pl.col(messages).list.eval(element.field("role") + ": " + element.field("content")).list.join("\n"))


def _answer_chars(messages: str) -> pl.Expr:
    return pl.col(messages).list.eval(pl.element().struct.field("content").str.len_chars()).list.sum()


# ---------------------------------------------------------------------------------------------
# Steps: each returns the frame with `drop_reason` (and `duplicate_of`) filled where it drops


def _degenerate(frame: pl.DataFrame, config: CurateConfig) -> pl.DataFrame:
    margin = pl.col("chosen_score") - pl.col("rejected_score")
    shortest = pl.min_horizontal(_answer_chars("chosen"), _answer_chars("rejected"))
    longest = pl.max_horizontal(_answer_chars("chosen"), _answer_chars("rejected"))
    rules = [
        ("identical_after_normalisation", pl.col("chosen_norm") == pl.col("rejected_norm")),
        ("empty_answer", shortest == 0),
        ("tie", margin == 0),
        ("low_margin", margin < config.min_margin if config.min_margin is not None else pl.lit(False)),
        ("too_short", shortest < config.min_chars),
        ("too_long", longest > config.max_chars if config.max_chars is not None else pl.lit(False)),
    ]
    reason = pl.when(pl.lit(False)).then(pl.lit(None, pl.String))
    for name, condition in rules:
        reason = reason.when(condition.fill_null(False)).then(pl.lit(name))
    return frame.with_columns(drop_reason=pl.coalesce("drop_reason", reason.otherwise(None)))


def _exact_duplicates(frame: pl.DataFrame) -> pl.DataFrame:
    """Among live rows, every pair whose normalised (prompt, chosen, rejected) was seen at an
    earlier row is dropped and points at that row's id."""
    key = ["prompt_norm", "chosen_norm", "rejected_norm"]
    live = pl.col("drop_reason").is_null()
    first_id = pl.col("id").filter(live).first().over(key)
    is_later = live & (pl.col("row").filter(live).first().over(key) != pl.col("row"))
    return frame.with_columns(
        drop_reason=pl.when(is_later).then(pl.lit("duplicate")).otherwise("drop_reason"),
        duplicate_of=pl.when(is_later).then(first_id).otherwise("duplicate_of"),
    )


def _decontaminate(frame: pl.DataFrame, config: CurateConfig) -> pl.DataFrame:
    if not config.decontaminate:
        return frame
    from prefdata.evalsets import load_eval_texts

    eval_texts = pl.select(_fold(pl.lit(pl.Series(load_eval_texts(config.decontaminate), dtype=pl.String)))).to_series()
    eval_grams = np.unique(shingles(eval_texts, config.decontaminate_ngram)[1])
    hit = np.zeros(frame.height, dtype=bool)
    for column in ("prompt_norm", "chosen_norm", "rejected_norm"):
        hit |= shares_shingle(_strip_roles(frame[column]), config.decontaminate_ngram, eval_grams)
    return frame.with_columns(
        drop_reason=pl.when(pl.Series(hit) & pl.col("drop_reason").is_null()).then(pl.lit("contaminated")).otherwise("drop_reason")
    )


def _strip_roles(texts: pl.Series) -> pl.Series:
    """Evaluation items are plain text: compare against message contents, not role tags."""
    return texts.str.replace_all(r"(^|\n)(system|user|assistant): ", " ").str.replace_all(r"\s+", " ").str.strip_chars()


def _prompt_clusters(live: pl.DataFrame, config: CurateConfig) -> pl.DataFrame:
    """Adds `prompt_cluster` (near-duplicate prompt cluster, or exact normalised prompt when near-dedupe
    is off) and `rank` (0 = the cluster's best pair: largest score margin, then earliest row).

    The cluster is named by its best pair's id: a content hash, so the name (and the split it
    decides) does not depend on input order or library versions, and it survives re-running
    curate on its own output, where the best pair is still there and still first."""
    if config.near_dup and live.height:
        labels = prompt_clusters(live["prompt_norm"], config.ngram, config.threshold, config.num_perm, config.seed)
    else:
        labels = _group_labels(live["prompt_norm"])
    # A cluster from an earlier curate run stays one cluster, even where the pair that linked its
    # members was dropped since (capped, deduplicated): rows sharing a prompt_cluster are joined.
    prior = live["prompt_cluster"]
    if prior.null_count() < live.height:
        linked = _group_labels(prior.fill_null(live["id"]))
        rows = np.arange(live.height)
        labels = components(live.height, np.r_[rows, rows], np.r_[labels, linked])
    margin = (pl.col("chosen_score") - pl.col("rejected_score")).fill_null(float("-inf"))
    # Rank on a narrow frame: sorting the full records (nested messages) would copy them all.
    ranked = (live.select("row", "id", margin.alias("margin")).with_columns(label=pl.Series(labels))
              .sort(["label", "margin", "row"], descending=[False, True, False])
              .with_columns(prompt_cluster=pl.col("id").first().over("label"), rank=pl.int_range(pl.len()).over("label"))
              .sort("row"))
    return live.drop("prompt_cluster").with_columns(ranked["prompt_cluster"], ranked["rank"])


def _group_labels(keys: pl.Series) -> np.ndarray:
    """Label each row by the first row with the same key."""
    return pl.DataFrame({"key": keys}).with_row_index("i").select(pl.col("i").first().over("key"))["i"].to_numpy().astype(np.int64)


def _cap_per_cluster(live: pl.DataFrame, config: CurateConfig) -> pl.DataFrame:
    """Keep at most K pairs per prompt cluster, best first (see `_prompt_clusters`)."""
    if config.max_pairs_per_prompt is None:
        return live
    over_cap = pl.col("rank") >= config.max_pairs_per_prompt
    return live.with_columns(drop_reason=pl.when(over_cap).then(pl.lit("prompt_cap")).otherwise("drop_reason"))


def _split(frame: pl.DataFrame, config: CurateConfig) -> pl.DataFrame:
    """eval iff hash(seed, cluster) / 2^64 < eval_fraction; blake2b so the split does not change
    with the polars version or the machine."""
    keys = frame["prompt_cluster"].unique().sort().to_list()
    unit = [int.from_bytes(hashlib.blake2b(f"{config.seed}:{k}".encode(), digest_size=8).digest(), "big") / 2**64 for k in keys]
    is_eval = pl.DataFrame({"prompt_cluster": keys, "is_eval": [u < config.eval_fraction for u in unit]})
    return frame.join(is_eval, on="prompt_cluster", how="left", maintain_order="left")


# ---------------------------------------------------------------------------------------------
# The stage


def curate(config: CurateConfig) -> Manifest:
    records, inputs = _load_inputs(config.inputs)
    frame = records.with_columns(
        prompt_norm=_normalised("prompt"), chosen_norm=_normalised("chosen"), rejected_norm=_normalised("rejected"),
        drop_reason=pl.lit(None, pl.String), duplicate_of=pl.lit(None, pl.String),
    )
    frame = _degenerate(frame, config)
    frame = _exact_duplicates(frame)
    frame = _decontaminate(frame, config)
    live = frame.filter(pl.col("drop_reason").is_null())
    live = _cap_per_cluster(_prompt_clusters(live, config), config)
    frame = pl.concat([frame.filter(pl.col("drop_reason").is_not_null()), live.filter(pl.col("drop_reason").is_not_null())],
                      how="diagonal_relaxed").sort("row")
    live = _split(live.filter(pl.col("drop_reason").is_null()), config)
    outputs = {
        "train.parquet": live.filter(~pl.col("is_eval")).select(CURATED_COLUMNS).to_arrow().cast(CURATED_SCHEMA),
        "eval.parquet": live.filter(pl.col("is_eval")).select(CURATED_COLUMNS).to_arrow().cast(CURATED_SCHEMA),
        "dropped.parquet": frame.filter(pl.col("drop_reason").is_not_null()).select(DROPPED_SCHEMA.names).to_arrow().cast(DROPPED_SCHEMA),
    }
    dropped = Counter(frame["drop_reason"].drop_nulls().to_list())
    cluster_sizes = live.group_by("prompt_cluster").len()["len"]
    stats: dict[str, Any] = {
        "train": outputs["train.parquet"].num_rows,
        "eval": outputs["eval.parquet"].num_rows,
        "prompt_clusters": cluster_sizes.len(),
        "largest_cluster": int(cluster_sizes.max() or 0),
        "rows_in_multi_member_clusters": int(cluster_sizes.filter(cluster_sizes > 1).sum()),
        "eval_clusters": live.filter(pl.col("is_eval"))["prompt_cluster"].n_unique(),
    }
    manifest = Manifest(
        stage="curate",
        package_version=__version__,
        config=config.model_dump(),
        inputs=inputs,
        counts=Counts(read=records.height, kept=live.height, dropped=dict(sorted(dropped.items()))),
        outputs=list(outputs),
        stats=stats,
        versions={"polars": pl.__version__, "pyarrow": pa.__version__, "numpy": np.__version__},
    )
    with atomic_dir(config.out) as out_dir:
        for name, table in outputs.items():
            pq.write_table(table, out_dir / name)
        manifest.write(out_dir)
    return manifest


def summary_table(manifest: Manifest) -> Any:
    from rich.table import Table

    table = Table("", "records", title=f"curate → {manifest.config['out']}")
    table.add_row("read", f"{manifest.counts.read:,}")
    for reason, n in manifest.counts.dropped.items():
        table.add_row(f"dropped: {reason}", f"{n:,}")
    table.add_row("train", f"{manifest.stats['train']:,}")
    table.add_row("eval", f"{manifest.stats['eval']:,}")
    table.add_row("prompt clusters (largest)", f"{manifest.stats['prompt_clusters']:,} ({manifest.stats['largest_cluster']})")
    return table
