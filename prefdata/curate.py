"""Stage 2: record sets → train / eval record sets a careful team would trust.

Order of the steps (each reported in the manifest):
  1. read every input, order by (source, source_row, id) so nothing depends on input order;
  2. degenerate pairs: identical after normalisation, empty answer, tied scores, score margin
     below --min-margin, answers outside --min-chars / --max-chars;
  3. contradicting labels: the same pair with chosen and rejected swapped (after normalisation)
     is resolved by majority of its records; the minority, and both sides of a tie, are dropped;
     then exact duplicates of the whole normalised pair: the first by (source, source_row) is kept;
  4. decontamination against evaluation sets (shared word n-grams);
  5. near-duplicate prompt clusters (prefdata.neardup: word 1+2-grams with a length-adapted
     threshold for short prompts, word n-grams for long ones; MinHash LSH) and --max-pairs-per-prompt;
  6. split by a hash of the prompt cluster, so a cluster never straddles train and eval.
With --score-with (prefdata.label_noise), the pairs still kept after step 4 are scored by a
reward model (or a policy's implicit reward) before step 5: each gets a `label_margin`, pairs it
prefers the other way by more than --suspect-margin are flagged `label_suspect`, and with
--drop-suspect dropped as `suspect_label`. Off, nothing of this runs and the outputs are unchanged.
Normalisation for comparisons is NFKC, case-folded, whitespace collapsed; the records themselves
are written unchanged.

Unpaired record sets (one completion with a desirable/undesirable label: KTO data) go through the
same steps with the completion in the answers' place: degenerate completions (empty, too short or
long), contradicting labels (one prompt + completion labelled both ways: the same majority vote),
exact duplicates (prompt + completion + label), decontamination, near-duplicate prompt clusters,
--max-pairs-per-prompt (the first K records of a cluster: there is no margin), and the split. The
manifest counts desirable and undesirable records per split, with the weights KTO's loss wants for
the train split's balance. Options that only mean something for pairs (--min-margin,
--score-with) are refused for them.

Memory is bounded by `chunk_rows`, not by the input (docs/curate.md, "Curate at scale"):
  pass 1 streams the inputs `chunk_rows` records at a time and keeps one narrow row per record
         (id, sort keys, score margin, per-record drop reason, 128-bit keys of the normalised pair
         and prompt); prompt comparison texts go to a spill file on disk (prefdata.spill);
  decide runs steps 2–6 on the narrow table; near-duplicate signatures live on disk and are read a
         band of columns at a time (prefdata.neardup.SignatureFile);
  pass 2 streams the inputs again and writes each record where it was decided, in (source,
         source_row, id) order: directly when the inputs are already in that order, otherwise
         through a bucket sort on disk (prefdata.spill.bucket_sort: one bucket of `chunk_rows`
         records in memory at a time).
Every step decides exactly what the single-frame version decided (tests/test_curate_chunked.py).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash
from pydantic import BaseModel, ConfigDict, Field, model_validator

from prefdata import __version__
from prefdata.engine import Engine, EngineOptions, session
from prefdata.label_noise import SCORED_COLUMNS, SUSPECT_LABEL, LabelScorer, label_margins, label_stats
from prefdata.neardup import (
    SignatureFile,
    comparison_text,
    components,
    scheme_edges,
    scheme_members,
    scheme_shingler,
    shares_shingle,
    shingles,
    signatures,
    strip_roles,
    text_sizes,
)
from prefdata.spill import IpcSpill, bucket_sort
from schemas.errors import UserError
from schemas.io import parquet_batches, parquet_read, sha256_file
from schemas.location import check_output, input_dirs, is_uri, local_path, output_dir, shown
from schemas.manifest import Counts, InputFile, Manifest
from schemas.progress import progress
from schemas.records import ANSWERS, PAIRED, RECORD_FILES, UNPAIRED, record_kind, record_schema
from schemas.render import CHAT_TEMPLATE_KWARGS_HELP, ChatTemplateKwargs, SystemTurn

# train/eval.parquet are records plus the prompt cluster they were split by; a later curate run
# over them keeps those clusters whole. One layout per record kind (pairs, unpaired completions).
CURATED_SCHEMAS = {kind: record_schema(kind).append(pa.field("prompt_cluster", pa.string())) for kind in (PAIRED, UNPAIRED)}
DROPPED_FIELDS = [pa.field("drop_reason", pa.string()), pa.field("duplicate_of", pa.string())]
CURATED_SCHEMA = CURATED_SCHEMAS[PAIRED]
CURATE_DROPPED_SCHEMA = pa.schema([*CURATED_SCHEMA, *DROPPED_FIELDS])
CURATED_COLUMNS = CURATED_SCHEMA.names
# With --score-with, every output also carries each pair's margin under the scorer and its flag.
LABEL_FIELDS = [pa.field("label_margin", pa.float64()), pa.field("label_suspect", pa.bool_())]

# Output row groups have a fixed size, so an output file's bytes depend only on its rows, not on
# chunk_rows or on how the inputs were split into files.
ROW_GROUP_ROWS = 65_536
DEGENERATE_REASONS = ("identical_after_normalisation", "empty_answer", "non_finite_score", "tie", "low_margin", "too_short",
                      "too_long")
DROP_REASONS = (*DEGENERATE_REASONS, "conflicting_label", "duplicate", "contaminated", "prompt_cap", SUSPECT_LABEL)
_REASON = pl.Enum(DROP_REASONS)
TRAIN, EVAL, DROPPED = 0, 1, 2
_OUTPUT_NAMES = {TRAIN: "train.parquet", EVAL: "eval.parquet", DROPPED: "dropped.parquet"}


class CurateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: list[str] = Field(description="Record sets: outputs of prefdata ingest (or curate), directories or object-store URIs.")
    out: str = Field(description="Directory, or object-store URI (s3://…; docs/cluster.md), for train/eval/dropped.parquet and "
                     "manifest.json.")
    near_dup: bool = Field(True, description="Cluster near-duplicate prompts (MinHash LSH).")
    ngram: int = Field(5, gt=0, description="Word n-gram size of the MinHash shingles for prompts of 120+ words "
                       "(shorter prompts: word 1+2-grams, see docs/curate.md).")
    threshold: float = Field(0.8, gt=0, le=1, description="Jaccard similarity at which prompts are near-duplicates; also caps "
                             "the length-adapted threshold of short prompts.")
    num_perm: int = Field(128, ge=8, le=1024, description="MinHash permutations.")
    max_pairs_per_prompt: int | None = Field(None, gt=0, description="Keep at most K pairs per prompt cluster (largest margins; "
                                              "unpaired records: the first K).")
    min_margin: float | None = Field(None, description="Drop pairs whose chosen_score - rejected_score is below this.")
    min_chars: int = Field(1, ge=0, description="Drop pairs with an answer shorter than this.")
    max_chars: int | None = Field(None, gt=0, description="Drop pairs with an answer longer than this.")
    decontaminate: list[str] = Field([], description="Evaluation set (any ingestible file, record dir, or .txt); repeatable.")
    decontaminate_ngram: int = Field(13, gt=0, description="Shared word n-gram length that counts as contamination.")
    eval_fraction: float = Field(0.02, ge=0, lt=1, description="Fraction of prompt clusters held out for eval.")
    seed: int = Field(0, description="Seed of the split hash and the MinHash permutations.")
    chunk_rows: int = Field(200_000, gt=0, description="Records held in memory at once in each pass; lower it to reduce peak "
                            "memory. The output does not depend on it.")
    score_with: str | None = Field(None, description="Label noise: a reward model (e.g. prefdata train --objective reward's "
                                   "final/), or with --score-reference a policy, scores every kept pair; its margin goes in "
                                   "a label_margin column and the manifest counts suspects per source (docs/curate.md).")
    score_reference: str | None = Field(None, description="The policy's reference: --score-with is scored by the implicit "
                                        "reward beta*(log pi - log pi_ref) of chosen over rejected.")
    score_beta: float = Field(0.1, gt=0, description="beta of the implicit reward margin (--score-reference).")
    suspect_margin: float = Field(2.0, ge=0, description="A scored pair whose margin is below minus this (the scorer "
                                  "prefers the rejected answer by more) is flagged label_suspect.")
    drop_suspect: bool = Field(False, description="Drop the flagged pairs (reason suspect_label) instead of keeping them.")
    score_template: Literal["auto", "chat", "plain"] = Field("auto", description="Scoring renders records as prefdata "
                                                             "tokenize --template does, with the scorer's tokenizer.")
    score_chat_template_kwargs: ChatTemplateKwargs = Field({}, description="Scoring: " + CHAT_TEMPLATE_KWARGS_HELP)
    score_system_turn: SystemTurn = Field("fold", description="Scoring: as prefdata tokenize --system-turn.")
    score_max_length: int = Field(2048, gt=1, description="Scoring: pairs longer than this are cut as prefdata tokenize "
                                  "--overflow truncate cuts them (prompt from the left, to half of it).")
    score_batch_size: int = Field(16, gt=0, description="Pairs per scoring forward pass.")
    score_device: str = Field("auto", description="Scoring: auto, cuda, mps or cpu.")
    score_dtype: str = Field("auto", description="Scoring: auto (bfloat16 on a GPU that has it, else float32), float32, "
                             "bfloat16, float16.")
    execution: EngineOptions = EngineOptions()

    @model_validator(mode="after")
    def _scoring(self) -> CurateConfig:
        if self.score_with is None:
            given = [name for name, on in (("--score-reference", self.score_reference is not None),
                                           ("--drop-suspect", self.drop_suspect)) if on]
            if given:
                raise UserError(f"{' and '.join(given)} need --score-with (a reward model, or a policy with --score-reference)")
        return self

    @property
    def scored(self) -> bool:
        return self.score_with is not None


def _spill_schema(scored: bool, kind: str) -> pa.Schema:
    """Pass 2's spilled rows: the dropped layout plus where each row goes."""
    return _output_schema(DROPPED, scored, kind).append(pa.field("row", pa.int64())).append(pa.field("dest", pa.int8()))


def _output_schema(dest: int, scored: bool, kind: str) -> pa.Schema:
    schema = CURATED_SCHEMAS[kind]
    return pa.schema([*schema, *(DROPPED_FIELDS if dest == DROPPED else []), *(LABEL_FIELDS if scored else [])])


def _answers(columns: list[str]) -> tuple[str, ...]:
    """The answer columns of a record table: a pair's two, or an unpaired record's completion."""
    return ANSWERS[record_kind(columns)]


# ---------------------------------------------------------------------------------------------
# Inputs


def _record_files(dirs: list[Path]) -> tuple[list[Path], str]:
    """Every record file of every input set, checked before anything is read or written, and the
    record kind they share (pairs or unpaired completions)."""
    files, kinds = [], {}
    for directory in dirs:
        manifest = Manifest.read(directory, stages=tuple(RECORD_FILES))
        for name in RECORD_FILES[manifest.stage]:
            path = directory / name
            if not path.is_file():
                raise UserError(f"{path} missing; re-run prefdata {manifest.stage} for {directory}")
            with parquet_read(path, f"re-run prefdata {manifest.stage} for {directory}"):
                schema = pq.read_schema(path)
            kind = record_kind(schema.names)
            if not all(field in schema for field in record_schema(kind)):
                raise UserError(f"{path}: not a prefdata record set (columns {schema.names}); re-run prefdata {manifest.stage}")
            kinds.setdefault(kind, path)
            files.append(path)
    if not files:
        raise UserError("no input record sets given")
    if len(kinds) > 1:
        raise UserError(f"{kinds[PAIRED]} holds pairs and {kinds[UNPAIRED]} unpaired completions; curate them apart "
                        "(or ingest the pairs with --unpaired)")
    return files, next(iter(kinds))


def checked_inputs(config: CurateConfig, dirs: list[Path] | None = None) -> tuple[list[Path], str]:
    """The record files of the input sets (`dirs`: their local copies, default `config.inputs`) and
    their kind, refusing the options that only pairs have for an unpaired set (the command calls
    it before it loads a scorer)."""
    files, kind = _record_files(dirs if dirs is not None else [local_path(i) for i in config.inputs])
    if kind == UNPAIRED:
        given = [name for name, on in (("--min-margin", config.min_margin is not None), ("--score-with", config.scored)) if on]
        if given:
            raise UserError(f"{' and '.join(given)}: pair options (a score margin, a label margin between two answers); "
                            "an unpaired record set has one completion per record, drop them")
    return files, kind


def _input_file(path: Path) -> InputFile:
    rows = pq.ParquetFile(path).metadata.num_rows
    return InputFile(path=str(path), sha256=sha256_file(path), bytes=path.stat().st_size, rows=rows)


def _input_chunks(inputs: list[InputFile], chunk_rows: int, columns: list[str]) -> Iterator[pa.Table]:
    """The inputs' records in file order, at most `chunk_rows` at a time, as `columns` of the
    curated layout (a record set without prompt clusters gets null ones)."""
    for item in inputs:
        parquet = pq.ParquetFile(item.path)
        present = [c for c in columns if c in parquet.schema_arrow.names]
        for batch in parquet_batches(item.path, batch_size=chunk_rows, columns=present):
            table = pa.Table.from_batches([batch])
            if "prompt_cluster" in columns and "prompt_cluster" not in present:
                table = table.append_column("prompt_cluster", pa.nulls(table.num_rows, pa.string()))
            yield table.select(columns)


# ---------------------------------------------------------------------------------------------
# Comparison forms


def _fold(text: pl.Expr) -> pl.Expr:
    """The form texts are compared in: NFKC, case-folded, whitespace collapsed."""
    return text.str.normalize("NFKC").str.to_lowercase().str.replace_all(r"\s+", " ").str.strip_chars()


def _normalised(messages: str, without_system: bool = False) -> pl.Expr:
    """One comparable string per message list, roles kept; `without_system`: the user and
    assistant turns alone, what a prompt asks (near-duplicates are judged on it: a system prompt
    shared by many records would make every short request behind it look alike)."""
    element = pl.element().struct
    turns = pl.col(messages)
    if without_system:
        turns = turns.list.eval(pl.element().filter(element.field("role") != "system"))
    return _fold(turns.list.eval(element.field("role") + ": " + element.field("content")).list.join("\n"))


def _answer_chars(messages: str) -> pl.Expr:
    return pl.col(messages).list.eval(pl.element().struct.field("content").str.len_chars()).list.sum()


def _key128(texts: pl.Series) -> np.ndarray:
    """[n, 2] uint64: xxh3-128 of each text's UTF-8 bytes. Only equality of keys is used (exact
    duplicates, identical prompts), so a 128-bit key stands in for the text (collision odds at
    10^7 texts: ~10^-25) and the narrow table never holds the texts themselves."""
    digests = b"".join(xxhash.xxh3_128_digest(t.encode()) for t in texts.fill_null("").to_list())
    return np.frombuffer(digests, dtype=np.uint64).reshape(-1, 2) if digests else np.empty((0, 2), np.uint64)


def _pair_text(answers: tuple[str, ...]) -> pl.Expr:
    """The normalised prompt and its two answers, in either order, as one string (the smaller answer
    first, lengths first so it splits one way only): a pair and its swapped twin get one key, and
    `_swapped()` says which way round each record has them. An unpaired record: its prompt and
    completion, whose label is its side."""
    norms = [f"{a}_norm" for a in answers]
    parts = [pl.col("prompt_norm"), *([pl.min_horizontal(*norms), pl.max_horizontal(*norms)] if len(norms) == 2 else [pl.col(norms[0])])]
    return pl.concat_str([*(p.str.len_chars().cast(pl.String) for p in parts), pl.lit(""), *parts], separator=":")


def _swapped(answers: tuple[str, ...]) -> pl.Expr:
    """Does the record prefer the larger of its two normalised answers (the pair key's second)? For
    an unpaired record: its label. Records of one key on both sides contradict each other."""
    if len(answers) == 1:
        return pl.col("label")
    return (pl.col("chosen_norm") > pl.col("rejected_norm")).fill_null(False)


# ---------------------------------------------------------------------------------------------
# Pass 1: one narrow row per record


def _degenerate(frame: pl.DataFrame, config: CurateConfig) -> pl.DataFrame:
    """The degenerate reasons of each record; an unpaired record has one answer and no margin, so
    only its completion's length can make it degenerate."""
    answers = _answers(frame.columns)
    paired = len(answers) == 2
    margin = pl.col("chosen_score") - pl.col("rejected_score") if paired else pl.lit(None, pl.Float64)
    shortest = pl.min_horizontal(*map(_answer_chars, answers))
    longest = pl.max_horizontal(*map(_answer_chars, answers))
    rules = [
        ("identical_after_normalisation", pl.col("chosen_norm") == pl.col("rejected_norm") if paired else pl.lit(False)),
        ("empty_answer", shortest == 0),
        # A record set from before ingest refused them, or made by hand: NaN passes every comparison
        # below and ranks first within its prompt.
        ("non_finite_score", margin.is_nan() | margin.is_infinite()),
        ("tie", margin == 0),
        ("low_margin", margin < config.min_margin if config.min_margin is not None else pl.lit(False)),
        ("too_short", shortest < config.min_chars),
        ("too_long", longest > config.max_chars if config.max_chars is not None else pl.lit(False)),
    ]
    assert [name for name, _ in rules] == list(DEGENERATE_REASONS)
    reason = pl.when(pl.lit(False)).then(pl.lit(None, pl.String))
    for name, condition in rules:
        reason = reason.when(condition.fill_null(False)).then(pl.lit(name))
    return frame.with_columns(drop_reason=reason.otherwise(None).cast(_REASON))


def _eval_grams(config: CurateConfig) -> np.ndarray | None:
    if not config.decontaminate:
        return None
    from prefdata.evalsets import load_eval_texts

    eval_texts = pl.select(_fold(pl.lit(pl.Series(load_eval_texts(config.decontaminate), dtype=pl.String)))).to_series()
    return np.unique(shingles(eval_texts, config.decontaminate_ngram)[1])


def _contaminated(frame: pl.DataFrame, config: CurateConfig, eval_grams: np.ndarray | None) -> np.ndarray:
    """Per record: does its prompt or an answer share a word n-gram with an evaluation set?"""
    hit = np.zeros(frame.height, dtype=bool)
    if eval_grams is None:
        return hit
    for column in ("prompt_norm", *(f"{a}_norm" for a in _answers(frame.columns))):
        # Evaluation items are plain text: compare against message contents, not role tags.
        hit |= shares_shingle(strip_roles(frame[column]), config.decontaminate_ngram, eval_grams)
    return hit


NARROW_INPUTS = {
    PAIRED: ["id", "prompt", "chosen", "rejected", "source", "source_row", "chosen_score", "rejected_score", "prompt_cluster"],
    UNPAIRED: ["id", "prompt", "completion", "label", "source", "source_row", "prompt_cluster"],
}


@dataclass
class _Narrow:
    """One entry per record, ~100 bytes: numpy columns and Arrow strings rather than a polars
    frame, so that ten million of them stay about a gigabyte and each column can be reordered
    (and its old copy freed) on its own."""

    ids: pa.Array
    source: np.ndarray  # index into `sources`
    source_row: np.ndarray
    margin: np.ndarray  # chosen_score − rejected_score, −inf when a score is missing (always, unpaired)
    reason: np.ndarray  # index into DROP_REASONS, −1 while the record is kept
    contaminated: np.ndarray
    pair_key: np.ndarray  # [n, 2] uint64 of the pair in either order (unpaired: prompt + completion), zero for records already dropped
    swapped: np.ndarray  # bool: which way round the record prefers the pair's answers (unpaired: its label)
    prompt_key: np.ndarray
    prior: pa.Array  # prompt_cluster from an earlier curate run, or null


def _narrow_chunk(table: pa.Table, first_pos: int, config: CurateConfig,
                  eval_grams: np.ndarray | None) -> tuple[dict[str, Any], list[str], pl.DataFrame | None]:
    """(narrow columns, the chunk's source names, prompt comparison texts of the records not
    dropped here) for one chunk; a pure function of the chunk, run by the engine's pool.

    Everything decided per record (degenerate reasons, contamination) is decided here; what
    needs all records (duplicates, clusters) gets keys: the normalised pair's and the prompt's
    (its comparison text with near-dedupe on, its normalised text without). The `source` column
    indexes the chunk's source names; `_pass1` numbers them across chunks."""
    answers = _answers(table.column_names)
    frame = pl.from_arrow(table).with_columns(prompt_norm=_normalised("prompt"), **{f"{a}_norm": _normalised(a) for a in answers})
    frame = _degenerate(frame, config)
    reason = frame["drop_reason"].to_physical().fill_null(-1).to_numpy().astype(np.int8)
    live = np.flatnonzero(reason < 0)
    kept = frame[live]
    prompt = comparison_text(kept.select(_normalised("prompt", without_system=True)).to_series()) if config.near_dup \
        else kept["prompt_norm"]
    pair_key, prompt_key = np.zeros((frame.height, 2), np.uint64), np.zeros((frame.height, 2), np.uint64)
    pair_key[live] = _key128(kept.select(_pair_text(answers)).to_series())
    swapped = frame.select(_swapped(answers)).to_series().to_numpy()
    prompt_key[live] = _key128(prompt)
    encoded = pc.dictionary_encode(table.column("source")).combine_chunks()
    columns = {
        "ids": table.column("id").combine_chunks().cast(pa.string()),
        "source": encoded.indices.to_numpy(zero_copy_only=False),
        "source_row": frame["source_row"].to_numpy(),
        "margin": (frame["chosen_score"] - frame["rejected_score"]).fill_null(float("-inf")).to_numpy() if len(answers) == 2
        else np.full(frame.height, float("-inf")),
        "reason": reason, "contaminated": _contaminated(frame, config, eval_grams),
        "pair_key": pair_key, "swapped": swapped, "prompt_key": prompt_key,
        "prior": table.column("prompt_cluster").combine_chunks().cast(pa.string()),
    }
    texts = None
    if config.near_dup:
        texts = pl.DataFrame([pl.Series("pos", first_pos + live.astype(np.int64)), prompt.alias("text")])
    return columns, encoded.dictionary.to_pylist(), texts


_NarrowJob = tuple[pa.Table, int, CurateConfig, np.ndarray | None]  # a chunk, its first record's position, config, eval n-grams


def _narrow_job(job: _NarrowJob) -> tuple[dict[str, Any], list[str], pl.DataFrame | None]:
    return _narrow_chunk(*job)


def _narrow_jobs(unit: tuple[InputFile, int, CurateConfig, np.ndarray | None, str]) -> Iterator[_NarrowJob]:
    """One input file's chunks, each with the input position of its first record (the unit holds
    the file's): the engine's read of one file."""
    item, pos, config, eval_grams, kind = unit
    for table in _input_chunks([item], config.chunk_rows, NARROW_INPUTS[kind]):
        yield table, pos, config, eval_grams
        pos += table.num_rows


def _pass1(inputs: list[InputFile], kind: str, config: CurateConfig, spill: Path, engine: Engine,
           fetched: bool) -> tuple[_Narrow, np.ndarray, IpcSpill, list[str]]:
    """(narrow table in output order, input position of each row, prompt texts, source names by
    the codes in `_Narrow.source`). Chunks are turned into narrow columns by the engine's pool
    (here, in this process, on the local engine), and come back in input order. `fetched`: the
    inputs are this process's copies of an object store's sets, which only its node can read."""
    eval_grams = _eval_grams(config)
    texts = IpcSpill(spill / "prompts.arrow")
    chunks: list[dict[str, Any]] = []
    sources: dict[str, int] = {}
    first_pos = np.cumsum([0] + [item.rows for item in inputs])
    # Absolute paths: a Ray task's working directory is not this process's.
    units = [(item.model_copy(update={"path": os.path.abspath(item.path)}), int(pos), config, eval_grams, kind)
             for item, pos in zip(inputs, first_pos)]
    with engine.pool(_narrow_job, 1) as pool:
        for columns, names, prompt_texts in pool.map_units(units, _narrow_jobs, here=fetched):
            code_of = np.array([sources.setdefault(name, len(sources)) for name in names] or [0], np.int32)
            columns["source"] = code_of[columns["source"]]
            chunks.append(columns)
            if prompt_texts is not None and prompt_texts.height:
                texts.write(prompt_texts.to_arrow())
    texts.close()
    if not chunks:  # no records at all: one empty chunk gives the narrow table its columns
        empty = CURATED_SCHEMAS[kind].empty_table().select(NARROW_INPUTS[kind])
        chunks.append(_narrow_chunk(empty, 0, config, eval_grams)[0])
    narrow = _Narrow(**{name: _concat([chunk.pop(name) for chunk in chunks]) for name in list(chunks[0])})
    order = _output_order(narrow, sources)
    return _reorder(narrow, order), order, texts, list(sources)


def _concat(parts: list) -> Any:
    return pa.concat_arrays(parts) if isinstance(parts[0], pa.Array) else np.concatenate(parts)


def _output_order(narrow: _Narrow, sources: dict[str, int]) -> np.ndarray:
    """Input positions in (source, source_row, id) order; Arrow's sort is stable, so records
    equal on all three keep their input order."""
    names = sorted(sources)  # Python orders str by code point, as polars and Arrow order UTF-8 bytes
    rank = np.zeros(max(len(names), 1), np.int32)
    rank[[sources[name] for name in names]] = np.arange(len(names))
    keys = pa.table({"source": rank[narrow.source], "source_row": narrow.source_row, "id": narrow.ids})
    # Nulls first, as polars sorts them (the record schema has none here; this only pins the order).
    order = pc.sort_indices(keys, sort_keys=[(name, "ascending", "at_start") for name in ("source", "source_row", "id")])
    return order.to_numpy().astype(np.int64)


def _reorder(narrow: _Narrow, order: np.ndarray) -> _Narrow:
    """The narrow table in `order`, one column at a time (the old copy of each goes at once)."""
    index = pa.array(order)
    for name, column in vars(narrow).items():
        setattr(narrow, name, pc.take(column, index) if isinstance(column, pa.Array) else column[order])
    return narrow


# ---------------------------------------------------------------------------------------------
# Decide: steps 3–6 on the narrow table (one row per record, in output order)


def _first_of_key(keys: np.ndarray, side: np.ndarray | None = None) -> np.ndarray:
    """For each of m [hi, lo] keys, the index of the first entry with the same key (and, when
    given, the same `side`)."""
    m = len(keys)
    if m == 0:
        return np.empty(0, np.int64)
    side = np.zeros(m, bool) if side is None else side
    order = np.lexsort((np.arange(m), side, keys[:, 1], keys[:, 0]))
    sorted_keys, sorted_side = keys[order], side[order]
    starts = np.flatnonzero(np.r_[True, (sorted_keys[1:] != sorted_keys[:-1]).any(axis=1) | (sorted_side[1:] != sorted_side[:-1])])
    first = np.empty(m, np.int64)
    first[order] = np.repeat(order[starts], np.diff(np.r_[starts, m]))
    return first


def _conflicting_labels(narrow: _Narrow) -> None:
    """Among live rows, records of one pair preferred both ways round (multi-annotator dumps: Arena,
    HelpSteer2, SHP) are resolved by majority: each record is a vote, the minority's records are
    dropped as `conflicting_label`, and on a tie all of them (nothing says which way is right)."""
    live = np.flatnonzero(narrow.reason < 0)
    _, group = np.unique(_first_of_key(narrow.pair_key[live]), return_inverse=True)
    side = narrow.swapped[live].astype(np.int64)
    votes = np.bincount(2 * group + side, minlength=2 * (group.max(initial=-1) + 1)).reshape(-1, 2)
    own, other = votes[group, side], votes[group, 1 - side]
    narrow.reason[live[(other > 0) & (own <= other)]] = DROP_REASONS.index("conflicting_label")


def _exact_duplicates(narrow: _Narrow) -> np.ndarray:
    """Among live rows, every pair whose normalised (prompt, chosen, rejected) was seen at an
    earlier row is dropped; returns the row each points at (−1 for the others)."""
    live = np.flatnonzero(narrow.reason < 0)
    first = live[_first_of_key(narrow.pair_key[live], narrow.swapped[live])]
    later = first != live
    duplicate_row = np.full(len(narrow.reason), -1, np.int64)
    duplicate_row[live[later]] = first[later]
    narrow.reason[live[later]] = DROP_REASONS.index("duplicate")
    return duplicate_row


def _prompt_labels(prompt_key: np.ndarray, live_pos: np.ndarray, config: CurateConfig, prompts: IpcSpill, n_records: int,
                   spill: Path, engine: Engine) -> np.ndarray:
    """Cluster label per live row (a live index of one of its members): identical prompt keys
    first, then near-duplicate clusters over the distinct prompts.

    Clustering distinct prompts gives the clusters clustering every row would: identical texts
    have identical signatures and Jaccard 1, and the distinct prompts, ordered by their first
    row, meet in each LSH band with the same first member as the rows would."""
    first = _first_of_key(prompt_key)
    if not config.near_dup or not len(first):
        return first
    nodes = np.unique(first)  # live index of each distinct prompt's first row, ascending
    if engine.name == "ray":  # the same clusters, computed across the cluster
        from prefdata.neardup_ray import near_duplicate_nodes

        node_labels = near_duplicate_nodes(live_pos[nodes], n_records, prompts, config)
    else:
        node_labels = _near_duplicate_nodes(live_pos[nodes], n_records, prompts, config, spill)
    return nodes[node_labels][np.searchsorted(nodes, first)]


def _near_duplicate_nodes(node_pos: np.ndarray, n_records: int, prompts: IpcSpill, config: CurateConfig,
                          spill: Path) -> np.ndarray:
    """prefdata.neardup.prompt_clusters over the distinct prompts (nodes, in first-row order),
    read from the spill a chunk at a time: signatures to disk, then LSH a band at a time, then
    exact verification on the candidate pairs' texts."""
    n_nodes = len(node_pos)
    node_of_pos = np.full(n_records, -1, np.int64)
    node_of_pos[node_pos] = np.arange(n_nodes)
    n_words, size_estimate = np.zeros(n_nodes, np.int64), np.zeros(n_nodes, np.int64)
    stores = {kind: SignatureFile(spill / f"signatures-{kind}.bin", config.num_perm) for kind, _ in scheme_members(n_words[:0])}
    slots: dict[str, list[np.ndarray]] = {kind: [] for kind in stores}  # node of each stored signature, in store order
    node_texts = IpcSpill(spill / "node_texts.arrow")
    try:
        for batch in prompts.batches():
            node = node_of_pos[batch.column("pos").to_numpy()]
            chosen = node >= 0
            node, text = node[chosen], pl.Series(batch.column("text")).filter(pl.Series(chosen))
            n_words[node], size_estimate[node] = text_sizes(text)
            node_texts.write(pa.table({"node": node, "text": text.to_arrow()}))
            for kind, members in scheme_members(n_words[node]):
                stores[kind].append(signatures(text.gather(members), scheme_shingler(kind, config.ngram), config.num_perm, config.seed))
                slots[kind].append(node[members])
        node_texts.close()
        sources, targets = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
        for kind, store in stores.items():
            stored = np.concatenate(slots[kind]) if slots[kind] else np.empty(0, np.int64)
            order = np.argsort(stored, kind="stable")  # store order → ascending node order
            members = stored[order]
            position = np.empty(len(order), np.int64)
            position[order] = np.arange(len(order))
            s, t = scheme_edges(kind, members, lambda lo, hi, store=store, position=position: store.columns(lo, hi, position),
                                lambda positions, members=members: _texts_of(node_texts, members[positions], n_nodes),
                                n_words, size_estimate, config.ngram, config.threshold, config.num_perm,
                                chunk_pairs=max(config.chunk_rows // 2, 1))
            sources.append(s)
            targets.append(t)
    finally:
        for store in stores.values():
            store.close()
    return components(n_nodes, np.concatenate(sources), np.concatenate(targets))


def _texts_of(node_texts: IpcSpill, nodes: np.ndarray, n_nodes: int) -> pl.Series:
    """Comparison texts of `nodes` (ascending), gathered from one scan of the spill."""
    wanted = np.zeros(n_nodes, bool)
    wanted[nodes] = True
    parts = []
    for batch in node_texts.batches():
        frame = pl.from_arrow(batch)
        parts.append(frame.filter(pl.Series(wanted[frame["node"].to_numpy()])))
    found = pl.concat(parts).sort("node")
    assert found.height == len(nodes)
    return found["text"]


def _link_prior_clusters(prior: pl.Series, ids: Callable[[], pl.Series], labels: np.ndarray) -> np.ndarray:
    """A cluster from an earlier curate run stays one cluster, even where the pair that linked its
    members was dropped since (capped, deduplicated): rows sharing a prompt_cluster are joined.
    `ids()` gives the live rows' ids, fetched only when there are prior clusters."""
    if prior.null_count() == len(prior):
        return labels
    linked = _group_labels(prior.fill_null(ids()))
    rows = np.arange(len(prior))
    return components(len(prior), np.r_[rows, rows], np.r_[labels, linked])


def _group_labels(keys: pl.Series) -> np.ndarray:
    """Label each row by the first row with the same key."""
    return pl.DataFrame({"key": keys}).with_row_index("i").select(pl.col("i").first().over("key"))["i"].to_numpy().astype(np.int64)


def _rank_in_clusters(rows: np.ndarray, margin: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each live row's place in its cluster (0 = the best pair: largest score margin, then
    earliest row; a NaN margin counts as the largest, as polars sorts it): what the per-cluster
    cap keeps first."""
    if len(rows) == 0:
        return np.empty(0, np.int64)
    nan = np.isnan(margin)
    order = np.lexsort((rows, -np.where(nan, 0.0, margin), ~nan, labels))
    starts = np.flatnonzero(np.r_[True, labels[order][1:] != labels[order][:-1]])
    sizes = np.diff(np.r_[starts, len(order)])
    rank = np.empty(len(rows), np.int64)
    rank[order] = np.arange(len(order)) - np.repeat(starts, sizes)
    return rank


def _named_clusters(labels: np.ndarray, prompt_keys: np.ndarray, prior: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """(each live row's cluster, as an index into the names; the names). A cluster keeps the name
    an earlier curate run gave it (the smallest, where its rows carried several), so curated data
    curated again, or with more added, keeps its split; a new cluster is named by a prompt, not a
    record: the smallest 128-bit key (`_key128`) of its live rows' prompts, before the cap, as 32
    hex digits. So a prompt's split depends on the prompts of its cluster alone: more answers to
    old prompts, or the same prompts curated as pairs and as unpaired feedback, land where they did."""
    if len(labels) == 0:
        return np.empty(0, np.int64), pa.array([], pa.string())
    _, cluster = np.unique(labels, return_inverse=True)
    order = np.lexsort((prompt_keys[:, 1], prompt_keys[:, 0], cluster))
    first = order[np.r_[True, cluster[order][1:] != cluster[order][:-1]]]  # one row per cluster, in cluster order
    named_before = (pl.DataFrame({"cluster": cluster, "prior": pl.Series(prior, dtype=pl.String)}).drop_nulls()
                    .group_by("cluster").agg(pl.col("prior").min()))
    names = pl.Series(_hex_keys(prompt_keys[first])).scatter(named_before["cluster"], named_before["prior"])
    return cluster, names.to_arrow()


def _hex_keys(keys: np.ndarray) -> pa.Array:
    """[m, 2] uint64 keys → m strings of 32 hex digits (high word first), built as one buffer: ten
    million Python strings would cost a gigabyte."""
    raw = np.ascontiguousarray(keys, dtype=">u8").view(np.uint8).reshape(-1, 16)
    digits = np.frombuffer(b"0123456789abcdef", np.uint8)
    text = np.empty((len(keys), 32), np.uint8)
    text[:, 0::2], text[:, 1::2] = digits[raw >> 4], digits[raw & 15]
    offsets = np.arange(0, 32 * len(keys) + 1, 32, dtype=np.int32)
    return pa.StringArray.from_buffers(len(keys), pa.py_buffer(offsets), pa.py_buffer(text.tobytes()))


def _is_eval(names: pa.Array, config: CurateConfig, batch: int = 100_000) -> np.ndarray:
    """eval iff blake2b(seed:cluster) / 2^64 < eval_fraction; blake2b so the split does not change
    with the polars version or the machine. A batch of names at a time: ten million Python
    strings would be a gigabyte."""
    is_eval = np.zeros(len(names), bool)
    for lo in range(0, len(names) if config.eval_fraction > 0 else 0, batch):
        keys = names.slice(lo, batch).to_pylist()
        unit = [int.from_bytes(hashlib.blake2b(f"{config.seed}:{k}".encode(), digest_size=8).digest(), "big") / 2**64 for k in keys]
        is_eval[lo:lo + len(keys)] = np.array(unit, dtype=np.float64) < config.eval_fraction
    return is_eval


@dataclass
class _Decisions:
    """Where every record goes, indexed by row (its place in (source, source_row, id) order)."""

    row_of_pos: np.ndarray  # input position → row
    dest: np.ndarray  # TRAIN / EVAL / DROPPED
    reason: np.ndarray  # index into DROP_REASONS, -1 for kept rows
    duplicate_row: np.ndarray  # row of the kept original, -1 unless a duplicate
    cluster_of: np.ndarray  # index into `cluster_names`, -1 for rows dropped before clustering
    cluster_names: pa.Array
    ids: pa.Array
    stats: dict[str, Any]
    label_margin: np.ndarray | None = None  # --score-with: the scorer's margin per row, NaN where not scored
    label_suspect: np.ndarray | None = None  # bool per row: margin < −suspect_margin

    @property
    def in_order(self) -> bool:
        return bool(np.array_equal(self.row_of_pos, np.arange(len(self.row_of_pos))))


def _decide(narrow: _Narrow, order: np.ndarray, config: CurateConfig, prompts: IpcSpill, spill: Path, engine: Engine,
            labels_of: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None) -> _Decisions:
    """Steps 3–6. `labels_of(row_of_pos, wanted)` (--score-with) gives each row's label margin,
    scoring the rows still kept after decontamination; the suspects among them are dropped before
    clustering with --drop-suspect, so the cap and the split see only the pairs that stay."""
    reason = narrow.reason
    _conflicting_labels(narrow)
    duplicate_row = _exact_duplicates(narrow)
    reason[narrow.contaminated & (reason < 0)] = DROP_REASONS.index("contaminated")
    n = len(reason)
    row_of_pos = np.empty(n, np.int64)
    row_of_pos[order] = np.arange(n)
    label_margin = label_suspect = None
    if labels_of is not None:
        label_margin = labels_of(row_of_pos, reason < 0)
        label_suspect = label_margin < -config.suspect_margin  # NaN (not scored) compares False
        if config.drop_suspect:
            reason[label_suspect & (reason < 0)] = DROP_REASONS.index(SUSPECT_LABEL)
    live_rows = np.flatnonzero(reason < 0)
    labels = _prompt_labels(narrow.prompt_key[live_rows], order[live_rows], config, prompts, len(order), spill, engine)
    labels = _link_prior_clusters(pl.Series(pc.take(narrow.prior, pa.array(live_rows))),
                                  lambda: pl.Series(pc.take(narrow.ids, pa.array(live_rows))), labels)
    rank = _rank_in_clusters(live_rows, narrow.margin[live_rows], labels)
    if config.max_pairs_per_prompt is not None:  # keep at most K pairs per cluster, best first
        reason[live_rows[rank >= config.max_pairs_per_prompt]] = DROP_REASONS.index("prompt_cap")
    cluster_of = np.full(n, -1, np.int64)
    cluster_of[live_rows], names = _named_clusters(labels, narrow.prompt_key[live_rows], pc.take(narrow.prior, pa.array(live_rows)))
    kept = np.flatnonzero(reason < 0)
    clusters, cluster_of_kept = np.unique(cluster_of[kept], return_inverse=True)
    eval_cluster = _is_eval(pc.take(names, pa.array(clusters)), config)
    dest = np.full(n, DROPPED, np.int8)
    dest[kept] = np.where(eval_cluster[cluster_of_kept], EVAL, TRAIN)
    return _Decisions(row_of_pos, dest, reason, duplicate_row, cluster_of, names, narrow.ids,
                      _stats(dest, kept, cluster_of_kept, eval_cluster, len(clusters)), label_margin, label_suspect)


def _stats(dest: np.ndarray, kept: np.ndarray, cluster_of_kept: np.ndarray, eval_cluster: np.ndarray, n_clusters: int) -> dict[str, Any]:
    sizes = np.bincount(cluster_of_kept, minlength=n_clusters)
    return {
        "train": int((dest == TRAIN).sum()),
        "eval": int((dest == EVAL).sum()),
        "prompt_clusters": n_clusters,
        "largest_cluster": int(sizes.max()) if n_clusters else 0,
        "rows_in_multi_member_clusters": int(sizes[sizes > 1].sum()),
        "eval_clusters": int(eval_cluster.sum()),
    }


# KTO (Ethayarajh et al. 2024, eq. 8) wants λD·nD / (λU·nU) in [1, 4/3]; TRL's KTOTrainer checks
# [1, 1.33] on the train set, and so does the advice here.
KTO_BALANCE = (1.0, 1.33)


def _label_balance(dest: np.ndarray, label: np.ndarray) -> dict[str, Any]:
    """Unpaired sets: desirable and undesirable records per split, and the KTO weights that put the
    train split's balance inside KTO_BALANCE: desirable_weight with undesirable_weight 1, or
    undesirable_weight with desirable_weight 1 (null when the train split lacks one label)."""
    counts = {name: {"desirable": int((label & (dest == code)).sum()), "undesirable": int((~label & (dest == code)).sum())}
              for code, name in ((TRAIN, "train"), (EVAL, "eval"))}
    n_d, n_u = counts["train"]["desirable"], counts["train"]["undesirable"]
    low, high = KTO_BALANCE
    weights = {"desirable_weight": [n_u / n_d * low, n_u / n_d * high],
               "undesirable_weight": [n_d / (n_u * high), n_d / (n_u * low)]} if n_d and n_u else None
    return {**counts, "kto_weights": weights}


# ---------------------------------------------------------------------------------------------
# Pass 2: records to their files


def _annotate(table: pa.Table, rows: np.ndarray, decisions: _Decisions) -> pa.Table:
    """A chunk of input records (curated columns) with its decisions, in `_spill_schema`."""
    cluster_of, duplicate_row, reason = decisions.cluster_of[rows], decisions.duplicate_row[rows], decisions.reason[rows]
    # Kept and capped rows carry the cluster found now; rows dropped before clustering keep their input's.
    cluster = pc.if_else(pa.array(cluster_of >= 0), pc.take(decisions.cluster_names, pa.array(np.maximum(cluster_of, 0))),
                         table.column("prompt_cluster").cast(pa.string()))
    kind = record_kind(table.column_names)
    columns = {name: table.column(name) for name in CURATED_SCHEMAS[kind].names}
    columns["prompt_cluster"] = cluster
    columns["drop_reason"] = pc.take(pa.array(DROP_REASONS), pa.array(reason, mask=reason < 0))
    columns["duplicate_of"] = pc.take(decisions.ids, pa.array(duplicate_row, mask=duplicate_row < 0))
    scored = decisions.label_margin is not None
    if scored:
        margin = decisions.label_margin[rows]
        unscored = np.isnan(margin)
        columns["label_margin"] = pa.array(margin, mask=unscored)
        columns["label_suspect"] = pa.array(decisions.label_suspect[rows], mask=unscored)
    columns["row"] = pa.array(rows)
    columns["dest"] = pa.array(decisions.dest[rows])
    return pa.table(columns).cast(_spill_schema(scored, kind))


class _ParquetOutput:
    """Rows appended in output order, written in row groups of exactly ROW_GROUP_ROWS."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self._writer = pq.ParquetWriter(path, schema)
        self._schema, self._pending, self._rows = schema, [], 0
        self.written = 0

    def add(self, table: pa.Table) -> None:
        self._pending.append(table.select(self._schema.names).cast(self._schema))
        self._rows += table.num_rows
        while self._rows >= ROW_GROUP_ROWS:
            self._flush(ROW_GROUP_ROWS)

    def _flush(self, rows: int) -> None:
        table = pa.concat_tables(self._pending)
        self._writer.write_table(table.slice(0, rows), row_group_size=rows)
        rest = table.slice(rows)
        self._pending, self._rows, self.written = [rest] if rest.num_rows else [], rest.num_rows, self.written + rows

    def close(self) -> None:
        if self._rows:
            self._flush(self._rows)
        if not self.written:  # an empty file as pq.write_table writes it: one empty row group
            self._writer.write_table(self._schema.empty_table())
        self._writer.close()


def _route(table: pa.Table, outputs: dict[int, _ParquetOutput]) -> None:
    """Rows of `table` (in row order) to train, eval or dropped."""
    dest = table.column("dest")
    for code, output in outputs.items():
        part = table.filter(pc.equal(dest, code))
        if part.num_rows:
            output.add(part)


def _pass2(inputs: list[InputFile], kind: str, decisions: _Decisions, config: CurateConfig, out_dir: Path,
           spill: Path) -> dict[int, int]:
    outputs = {code: _ParquetOutput(out_dir / name, _output_schema(code, config.scored, kind)) for code, name in _OUTPUT_NAMES.items()}
    annotated = _annotated_chunks(inputs, kind, decisions, config.chunk_rows)
    if decisions.in_order:  # the inputs are already in output order: stream straight through
        for table in annotated:
            _route(table, outputs)
    else:
        for table in bucket_sort(annotated, len(decisions.dest), config.chunk_rows, spill):
            _route(table, outputs)
    for output in outputs.values():
        output.close()
    return {code: output.written for code, output in outputs.items()}


def _annotated_chunks(inputs: list[InputFile], kind: str, decisions: _Decisions, chunk_rows: int) -> Iterator[pa.Table]:
    pos = 0
    for table in _input_chunks(inputs, chunk_rows, CURATED_SCHEMAS[kind].names):
        yield _annotate(table, decisions.row_of_pos[pos:pos + table.num_rows], decisions)
        pos += table.num_rows


# ---------------------------------------------------------------------------------------------
# The stage


def curate(config: CurateConfig, scorer: LabelScorer | None = None) -> Manifest:
    """The stage. With `config.score_with`, `scorer` is the model that scores the pairs
    (`train.label_scores.load_pair_scorer`; the `prefdata curate` command builds it, since this
    package never imports the model side)."""
    check_output(config.out, config.inputs)  # before the inputs are fetched and hashed
    with input_dirs(config.inputs) as dirs:
        files, kind = checked_inputs(config, dirs)
        if config.scored and scorer is None:
            raise UserError("curate --score-with needs its scorer: run prefdata curate, or pass "
                            "scorer=train.label_scores.load_pair_scorer(...) to prefdata.curate.curate")
        inputs = [_input_file(path) for path in files]
        with output_dir(config.out, config.inputs) as out_dir, session(config.execution) as engine:
            # Spill files live inside the output's temporary directory: a failed or killed run leaves
            # them where output_dir leaves its partial output, never beside the finished one.
            spill = out_dir / ".spill"
            spill.mkdir()
            narrow, order, prompts, source_names = _pass1(inputs, kind, config, spill, engine, any(map(is_uri, config.inputs)))
            refused: dict[str, int] = {}  # records the scorer's template could not render, by reason

            def labels_of(row_of_pos: np.ndarray, wanted: np.ndarray) -> np.ndarray:
                with progress("score labels", total=int(wanted.sum())) as bar:
                    margins, why = label_margins(_input_chunks(inputs, config.chunk_rows, SCORED_COLUMNS), row_of_pos, wanted,
                                                 scorer, config, bar)
                refused.update(why)
                return margins

            source = narrow.source
            decisions = _decide(narrow, order, config, prompts, spill, engine, labels_of if config.scored else None)
            if decisions.label_margin is not None:
                dropped = decisions.reason == DROP_REASONS.index(SUSPECT_LABEL) if config.drop_suspect else None
                decisions.stats["label_noise"] = label_stats(decisions.label_margin, source, source_names, decisions.label_suspect,
                                                             dropped, config, scorer, refused)
            if kind == UNPAIRED:
                decisions.stats["labels"] = _label_balance(decisions.dest, narrow.swapped)
            del narrow, order, source
            written = _pass2(inputs, kind, decisions, config, out_dir, spill)
            shutil.rmtree(spill)
            counts = Counts(read=len(decisions.dest), kept=written[TRAIN] + written[EVAL], dropped=_dropped_counts(decisions.reason))
            if written[DROPPED] != sum(counts.dropped.values()) or counts.read != sum(i.rows for i in inputs):
                raise RuntimeError(f"curate lost records: read {counts.read}, wrote {written}")  # a bug, never a user error
            manifest = Manifest(
                stage="curate",
                package_version=__version__,
                config=config.model_dump(),
                inputs=[item.model_copy(update={"path": shown(Path(item.path), dirs, config.inputs)}) for item in inputs],
                counts=counts,
                outputs=list(_OUTPUT_NAMES.values()),
                stats=decisions.stats,
                versions={"polars": pl.__version__, "pyarrow": pa.__version__, "numpy": np.__version__},
            )
            manifest.write(out_dir)
    return manifest


def _dropped_counts(reason: np.ndarray) -> dict[str, int]:
    counts = np.bincount(reason[reason >= 0].astype(np.int64), minlength=len(DROP_REASONS))
    return dict(sorted((DROP_REASONS[r], int(n)) for r, n in enumerate(counts) if n))


def summary_table(manifest: Manifest) -> Any:
    from rich.table import Table

    table = Table("", "records", title=f"curate → {manifest.config['out']}")
    table.add_row("read", f"{manifest.counts.read:,}")
    for reason, n in manifest.counts.dropped.items():
        table.add_row(f"dropped: {reason}", f"{n:,}")
    table.add_row("train", f"{manifest.stats['train']:,}")
    table.add_row("eval", f"{manifest.stats['eval']:,}")
    table.add_row("prompt clusters (largest)", f"{manifest.stats['prompt_clusters']:,} ({manifest.stats['largest_cluster']})")
    balance = manifest.stats.get("labels")
    if balance:
        for split in ("train", "eval"):
            table.add_row(f"{split}: desirable / undesirable", f"{balance[split]['desirable']:,} / {balance[split]['undesirable']:,}")
        weights = balance["kto_weights"]
        table.add_row("KTO weights for train's balance", "none: train lacks one of the labels" if weights is None else
                      "desirable_weight {:.3g}–{:.3g} (undesirable 1), or undesirable_weight {:.3g}–{:.3g} (desirable 1)".format(
                          *weights["desirable_weight"], *weights["undesirable_weight"]))
    labels = manifest.stats.get("label_noise")
    if labels:
        table.add_row("label margin: scored (scorer agrees)", f"{labels['scored']:,} ({labels['agree']:,})")
        table.add_row(f"label margin: suspect (< -{labels['suspect_margin']:g})", f"{labels['suspect']:,}")
    return table
