"""Stage 3: records → tokenized Arrow IPC shards (DESIGN.md, "Shard").

Rendering turns messages into text (the tokenizer's chat template, or a plain template for base
models); the Rust tokenizer then encodes whole batches at once. Per row we only do string slicing
and length arithmetic, in numpy where it matters.

The prompt ids are the tokens a model sees right before it writes an answer (the template's
generation prompt, or the part of it a rendered conversation shares); chosen/rejected ids are the
completion only and end with the template's end of turn exactly once (schemas/render.py holds the
rule, so generate and eval render and stop the same way). A pair that does not fit is dropped (`too_long`) or, with `--overflow truncate`,
cut: the prompt from the left (oldest tokens first, a leading BOS kept), completions from the
right. Every drop is counted and listed in `dropped.parquet`.

An unpaired record set (KTO's data: one completion and a label) gives unpaired shards: the
completion is rendered, encoded and fitted exactly as a pair's answer, and each kept row gets a KL
completion, another row's completion after its own prompt (`KlCompletions`, docs/tokenize.md).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator

from prefdata import __version__
from prefdata.engine import EngineOptions, session
from prefdata.pool import prestart
from schemas.cpus import usable_cpus
from schemas.errors import UserError, first_line
from schemas.fingerprint import tokenizer_fingerprint
from schemas.io import parquet_batches, parquet_read, sha256_file
from schemas.location import check_output, input_dirs, is_uri, output_dir, shown
from schemas.manifest import Counts, InputFile, Manifest, ShardFile
from schemas.progress import progress
from schemas.records import ANSWERS, PAIRED, RECORD_FILES, UNPAIRED, prompt_hash, record_kind
from schemas.render import CHAT_TEMPLATE_KWARGS_HELP, ChatTemplateKwargs, Renderer, SpecialTokensInText, SystemTurn, make_renderer
from schemas.shard import SHARD_SCHEMA, TOKEN_COLUMNS, UNPAIRED_SHARD_SCHEMA, shard_name

TOO_LONG = "too_long"
EMPTY_AFTER_TRUNCATION = "empty_after_truncation"
IDENTICAL_AFTER_TRUNCATION = "identical_after_truncation"
# Different answers the template renders alike (a DeepSeek-R1 template strips the reasoning before
# `</think>`): a pair with nothing left to prefer, which curate cannot see in the raw texts.
IDENTICAL_AFTER_RENDERING = "identical_after_rendering"

# A shard stores each answer column of ANSWERS as `<name>_input_ids`; an unpaired shard also the KL completion.
KL_COLUMN = TOKEN_COLUMNS[UNPAIRED][2]
KL_RULE = "nearest_earlier_other_prompt"  # KlCompletions, recorded in the manifest
# What the workers make: the shard's rows, less an unpaired shard's KL column (it needs other rows).
ENCODED_SCHEMA = {PAIRED: SHARD_SCHEMA,
                  UNPAIRED: UNPAIRED_SHARD_SCHEMA.remove(UNPAIRED_SHARD_SCHEMA.get_field_index(KL_COLUMN))}
SHARD_SCHEMA_OF = {PAIRED: SHARD_SCHEMA, UNPAIRED: UNPAIRED_SHARD_SCHEMA}


def prompt_length_limit(max_length: int, max_prompt_length: int | None) -> int:
    """--max-prompt-length as given, else half of --max-length: a fixed default would refuse
    `--max-length` at or below it, and half leaves the answers as much room as the prompt."""
    return max_prompt_length if max_prompt_length is not None else max_length // 2


class TokenizeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_dir: str = Field(description="Output of prefdata curate (train/eval) or prefdata ingest: a directory or an object-store URI.")
    tokenizer: str = Field(description="Tokenizer directory or Hub name (offline: a directory).")
    out: str = Field(description="Directory, or object-store URI (s3://…; docs/cluster.md), for the shards, dropped.parquet and "
                     "manifest.json.")
    template: Literal["auto", "chat", "plain"] = Field("auto", description="auto: the tokenizer's chat template if it has one, else plain.")
    chat_template_kwargs: ChatTemplateKwargs = Field({}, description=CHAT_TEMPLATE_KWARGS_HELP)
    special_tokens_in_text: SpecialTokensInText = Field("drop", description="A message holding a special token's string "
                                                        "(</s>, <|im_end|>): drop its record (special_token_in_text), or keep "
                                                        "it, the string encoded as that token (TRL's behaviour).")
    system_turn: SystemTurn = Field("fold", description="For a chat template without a system role: fold the system turn "
                                    "into the first user turn, or drop the record (system_not_supported).")
    max_length: int = Field(1024, gt=1, description="Prompt + completion tokens, per answer.")
    max_prompt_length: int | None = Field(None, gt=0, description="Prompt tokens (default: half of --max-length).")
    overflow: Literal["drop", "truncate"] = Field("drop", description="drop: pairs that do not fit are dropped (too_long); "
                                                  "truncate: cut them.")
    rows_per_shard: int = Field(50_000, gt=0, description="Rows per Arrow file.")
    batch_rows: int = Field(1024, gt=0, description="Records rendered and encoded per batch.")
    # the chat template is Python, so threads would not help
    workers: int = Field(default_factory=usable_cpus, gt=0, description="Processes that render and encode "
                         "(default: one per usable CPU).")
    execution: EngineOptions = EngineOptions()

    @model_validator(mode="after")
    def _lengths(self) -> TokenizeConfig:
        self.max_prompt_length = prompt_length_limit(self.max_length, self.max_prompt_length)
        if self.max_prompt_length >= self.max_length:
            raise UserError(
                f"--max-prompt-length ({self.max_prompt_length}) must be smaller than --max-length "
                f"({self.max_length}): completions need room"
            )
        return self

    def renderer(self, tokenizer: Any) -> Renderer:
        """The rendering rule these settings name, for `tokenizer`."""
        return make_renderer(tokenizer, self.template, self.chat_template_kwargs, self.system_turn, self.special_tokens_in_text)


def load_tokenizer(name_or_path: str) -> Any:
    """AutoTokenizer with one-line errors for a missing path, a directory without tokenizer files,
    or a Hub name that cannot be fetched offline."""
    from transformers import AutoTokenizer

    path = Path(name_or_path)
    looks_local = path.is_absolute() or name_or_path.startswith(".") or path.exists()
    if looks_local and not path.exists():
        raise UserError(f"tokenizer path {name_or_path} does not exist")
    if path.is_dir() and not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")):
        raise UserError(f"{name_or_path} holds no tokenizer files (tokenizer.json / tokenizer_config.json)")
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load tokenizer {name_or_path}: {first_line(exc)}") from None


# ---------------------------------------------------------------------------------------------
# Encoding and length policy


def batch_encoder(tokenizer: Any) -> Any:
    """texts → token ids, no special tokens added, with the Rust tokenizer's batch encoder.

    For a fast tokenizer this calls the backend's `encode_batch_fast` (no character offsets): the
    same ids as `tokenizer(texts, add_special_tokens=False)` in ~40% less time on short texts
    (measured on HH completions), because the Python wrapper's per-row dicts and masks are skipped. Padding and truncation stored in
    tokenizer.json are switched off first, as transformers does; slow tokenizers take the wrapper."""
    if not getattr(tokenizer, "is_fast", False):
        return lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    backend = tokenizer.backend_tokenizer
    backend.no_truncation()
    backend.no_padding()
    backend.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
    return lambda texts: [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]


class _Encoded:
    """Token ids of one batch (the prompt, and each answer column of ANSWERS) plus a drop reason
    per row (None = kept)."""

    def __init__(self, size: int, answers: tuple[str, ...]) -> None:
        self.prompt: list[list[int]] = [[] for _ in range(size)]
        self.answers: dict[str, list[list[int]]] = {name: [[] for _ in range(size)] for name in answers}
        self.prompt_id: list[str] = [""] * size
        self.reason: list[str | None] = [None] * size

    @property
    def chosen(self) -> list[list[int]]:
        return self.answers["chosen"]

    @property
    def rejected(self) -> list[list[int]]:
        return self.answers["rejected"]


def encode_batch(rows: list[dict], renderer: Renderer, encode: Any, answers: tuple[str, ...] = ANSWERS[PAIRED]) -> _Encoded:
    # Pairs made from one rated row share their prompt (UltraFeedback gives up to six, and curate
    # keeps them together): each distinct prompt is rendered, encoded and hashed once.
    keys = [tuple((m["role"], m["content"]) for m in r["prompt"]) for r in rows]
    slot: dict[tuple, int] = {}
    which = [slot.setdefault(key, len(slot)) for key in keys]
    distinct = list({key: r["prompt"] for key, r in zip(keys, rows)}.values())
    distinct_prompts = renderer.prompts(distinct)
    distinct_ids = encode([t or "" for t in distinct_prompts.texts])
    distinct_hashes = [prompt_hash(p) for p in distinct]

    prompts = [r["prompt"] for r in rows]
    prompt_texts = [distinct_prompts.texts[j] for j in which]
    rendered = [renderer.completions(prompts, prompt_texts, [r[name] for r in rows]) for name in answers]
    out = _Encoded(len(rows), answers)
    out.prompt_id = [distinct_hashes[j] for j in which]
    out.reason = [distinct_prompts.reasons[j] or next(filter(None, reasons), None)
                  for j, reasons in zip(which, zip(*(r.reasons for r in rendered)))]
    ok = [i for i, reason in enumerate(out.reason) if reason is None]
    bos = [renderer.tokenizer.bos_token_id] if renderer.add_bos_id else []
    end = renderer.appended_ids  # EOS only where the template renders no end of turn of its own
    for i in ok:
        out.prompt[i] = bos + distinct_ids[which[i]]
    for name, texts in zip(answers, rendered):
        for i, ids in zip(ok, encode([texts.texts[i] for i in ok])):
            out.answers[name][i] = ids + end
    if len(answers) == 2:  # a pair whose two answers render alike has nothing left to prefer
        for i in ok:
            if out.chosen[i] == out.rejected[i]:
                out.reason[i] = IDENTICAL_AFTER_RENDERING
    return out


def apply_length_policy(enc: _Encoded, config: TokenizeConfig, bos_id: int | None, stats: Counter) -> None:
    """Mark rows that do not fit as `too_long`, or truncate them in place (`--overflow truncate`)."""
    p = _lengths(enc.prompt)
    longest = np.max([_lengths(ids) for ids in enc.answers.values()], axis=0)
    alive = np.array([reason is None for reason in enc.reason], dtype=bool)
    overflow = alive & ((p > config.max_prompt_length) | (p + longest > config.max_length))
    for i in np.flatnonzero(overflow):
        if config.overflow == "drop":
            enc.reason[i] = TOO_LONG
        else:
            _truncate_row(enc, int(i), config, bos_id, stats)


def _lengths(ids: list[list[int]]) -> np.ndarray:
    return np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))


def _truncate_row(enc: _Encoded, i: int, config: TokenizeConfig, bos_id: int | None, stats: Counter) -> None:
    prompt = enc.prompt[i]
    if len(prompt) > config.max_prompt_length:
        keep_bos = bos_id is not None and prompt[0] == bos_id
        head = prompt[:1] if keep_bos else []
        prompt = head + prompt[len(prompt) - (config.max_prompt_length - len(head)):]
        stats["truncated_prompts"] += 1
    room = config.max_length - len(prompt)
    enc.prompt[i] = prompt
    cut = []
    for ids in enc.answers.values():
        stats["truncated_completions"] += int(len(ids[i]) > room)
        ids[i] = ids[i][:room]
        cut.append(ids[i])
    if not all(cut):
        enc.reason[i] = EMPTY_AFTER_TRUNCATION
    elif len(cut) == 2 and cut[0] == cut[1]:
        enc.reason[i] = IDENTICAL_AFTER_TRUNCATION


# ---------------------------------------------------------------------------------------------
# Shard writing


class ShardWriter:
    """Arrow IPC *file* format shards of at most `rows_per_shard` rows, named by split."""

    def __init__(self, out_dir: Path, split: str, rows_per_shard: int, schema: pa.Schema) -> None:
        self.out_dir, self.split, self.rows_per_shard, self.schema = out_dir, split, rows_per_shard, schema
        self.files: list[ShardFile] = []
        self._writer: ipc.RecordBatchFileWriter | None = None
        self._rows = 0

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            if self._writer is None:
                self._open()
            take = min(table.num_rows, self.rows_per_shard - self._rows)
            self._writer.write_table(table.slice(0, take))
            self._rows += take
            table = table.slice(take)
            if self._rows == self.rows_per_shard:
                self._close()

    def _open(self) -> None:
        name = shard_name(self.split, len(self.files))
        self._writer = ipc.new_file(self.out_dir / name, self.schema)
        self.files.append(ShardFile(name=name, split=self.split, rows=0, sha256=""))

    def _close(self) -> None:
        self._writer.close()
        shard = self.files[-1]
        self.files[-1] = shard.model_copy(update={"rows": self._rows, "sha256": sha256_file(self.out_dir / shard.name)})
        self._writer, self._rows = None, 0

    def close(self) -> list[ShardFile]:
        if self._writer is not None:
            self._close()
        return self.files


def _shard_table(rows: list[dict], enc: _Encoded, keep: list[int], schema: pa.Schema) -> pa.Table:
    ids = pa.list_(pa.int32())
    columns = {
        "id": pa.array([rows[i]["id"] for i in keep], pa.string()),
        "prompt_id": pa.array([enc.prompt_id[i] for i in keep], pa.string()),
        "prompt_input_ids": pa.array([enc.prompt[i] for i in keep], ids),
        **{f"{name}_input_ids": pa.array([answer[i] for i in keep], ids) for name, answer in enc.answers.items()},
    }
    if "label" in schema.names:
        columns["label"] = pa.array([rows[i]["label"] for i in keep], pa.bool_())
    return pa.table(columns, schema=schema)


def dropped_schema(kind: str) -> pa.Schema:
    """dropped.parquet: each row tokenize dropped, its reason and its token counts."""
    return pa.schema([("id", pa.string()), ("split", pa.string()), ("drop_reason", pa.string()), ("prompt_tokens", pa.int64()),
                      *((f"{name}_tokens", pa.int64()) for name in ANSWERS[kind])])


class KlCompletions:
    """The KL completions of one split of an unpaired shard set (docs/tokenize.md, "Unpaired
    records"): each row takes the completion ids of the nearest earlier kept row of the split
    whose prompt differs from its own; the split's leading rows of one prompt, which have none,
    take the completion of the first row with another prompt. Cut from the right to fit
    `--max-length` after the row's prompt.

    Fed the workers' tables in output order, so the rule sees the kept rows as the shards hold
    them, whatever the worker count or batch size. Only the previous row is carried from table
    to table, and the leading rows are held back until another prompt shows up."""

    def __init__(self, split: str, max_length: int) -> None:
        self.split, self.max_length = split, max_length
        self.held: list[pa.Table] = []  # the split's leading rows, all of one prompt
        # The previous row: (prompt id, completion, KL completion), the last two as 1-row arrays.
        self.previous: tuple[str, pa.Array, pa.Array] | None = None
        self.truncated = 0

    def add(self, table: pa.Table) -> list[pa.Table]:
        """The shard tables now complete, in order (none while the leading rows are held)."""
        if self.previous is None:
            self.held += [table] if table.num_rows else []
            if not self.held:
                return []
            first = self.held[0].column("prompt_id")[0].as_py()
            others = np.flatnonzero(_prompt_ids(table) != first)
            if not len(others):
                return []
            kl = table.column("completion_input_ids").combine_chunks().slice(int(others[0]), 1)
            self.previous = (first, kl, kl)  # the leading rows' earlier completion is never read
            held, self.held = self.held, []
            return [self._complete(t) for t in held]
        return [self._complete(table)] if table.num_rows else []

    def close(self) -> None:
        if self.held:
            rows = sum(t.num_rows for t in self.held)
            raise UserError(f"{self.split} split: all {rows} rows share one prompt, so KTO's KL term has no completion of "
                            "another prompt to score; curate so that the split holds at least two prompts")

    def _complete(self, table: pa.Table) -> pa.Table:
        prompt_ids = _prompt_ids(table)
        previous_id, previous_completion, previous_kl = self.previous
        changed = prompt_ids != np.array([previous_id, *prompt_ids[:-1]], dtype=object)
        # Candidates: [previous row's KL, previous row's completion, this table's completions];
        # a row after a prompt change takes the row before it, others the KL of the row before.
        source = np.maximum.accumulate(np.where(changed, np.arange(1, len(table) + 1), 0))
        completions = table.column("completion_input_ids").combine_chunks()
        kl = pc.take(pa.concat_arrays([previous_kl, previous_completion, completions]), pa.array(source))
        room = self.max_length - pc.list_value_length(table.column("prompt_input_ids")).to_numpy()
        kl, cut = _cut_lists(kl, room)
        self.truncated += cut
        last = len(table) - 1
        self.previous = (prompt_ids[last], completions.slice(last, 1), kl.slice(last, 1))
        index = UNPAIRED_SHARD_SCHEMA.get_field_index(KL_COLUMN)
        return table.add_column(index, UNPAIRED_SHARD_SCHEMA.field(index), kl)


def _prompt_ids(table: pa.Table) -> np.ndarray:
    return np.array(table.column("prompt_id").to_pylist(), dtype=object)


def _cut_lists(lists: pa.ListArray, room: np.ndarray) -> tuple[pa.ListArray, int]:
    """Each list cut to its first `room[i]` values, and how many lists were cut."""
    lengths = pc.list_value_length(lists).to_numpy()
    cut = int((lengths > room).sum())
    if not cut:
        return lists, 0
    keep = np.minimum(lengths, room)
    row = np.repeat(np.arange(len(lengths)), lengths)
    position = np.arange(len(row)) - (np.cumsum(lengths) - lengths)[row]
    values = lists.flatten().filter(pa.array(position < keep[row]))
    offsets = pa.array(np.concatenate([[0], np.cumsum(keep)]), pa.int32())
    return pa.ListArray.from_arrays(offsets, values), cut


# ---------------------------------------------------------------------------------------------
# One batch of records, the unit of work of the process pool


class TokenizedBatch(NamedTuple):
    read: int
    table: pa.Table  # the kept rows, in ENCODED_SCHEMA[kind]
    dropped: list[dict]  # dropped_schema(kind) rows without their split
    stats: Counter  # token and truncation counts


class RecordEncoder:
    """Records (pairs, or unpaired records: `kind`) → shard rows and drops: rendering, batch
    encoding and the length policy. Built once per process (the pool's initializer), then called
    on every batch."""

    def __init__(self, tokenizer: Any, config: TokenizeConfig, kind: str) -> None:
        self.renderer = config.renderer(tokenizer)
        self.encode = batch_encoder(tokenizer)
        self.config, self.kind = config, kind
        self.bos_id = tokenizer.bos_token_id

    def __call__(self, batch: pa.RecordBatch) -> TokenizedBatch:
        rows = batch.to_pylist()
        enc = encode_batch(rows, self.renderer, self.encode, ANSWERS[self.kind])
        stats: Counter = Counter()
        apply_length_policy(enc, self.config, self.bos_id, stats)
        keep = [i for i, reason in enumerate(enc.reason) if reason is None]
        dropped = [{"id": rows[i]["id"], "drop_reason": reason, "prompt_tokens": len(enc.prompt[i]),
                    **{f"{name}_tokens": len(ids[i]) for name, ids in enc.answers.items()}}
                   for i, reason in enumerate(enc.reason) if reason is not None]
        if not self.renderer.system_role and self.config.system_turn == "fold":
            stats["system_turns_folded"] += sum(rows[i]["prompt"][0]["role"] == "system" for i in keep)
        stats["prompt_tokens"] += sum(len(enc.prompt[i]) for i in keep)
        stats["completion_tokens"] += sum(len(ids[i]) for ids in enc.answers.values() for i in keep)
        return TokenizedBatch(len(rows), _shard_table(rows, enc, keep, ENCODED_SCHEMA[self.kind]), dropped, stats)


_encoder: RecordEncoder | None = None  # this process's, set by _start_encoder


def _start_encoder(tokenizer: Any, config: TokenizeConfig, kind: str) -> None:
    global _encoder
    _encoder = RecordEncoder(tokenizer, config, kind)


def _encode_job(batch: pa.RecordBatch) -> TokenizedBatch:
    return _encoder(batch)


# ---------------------------------------------------------------------------------------------
# The stage


def _input_files(input_dir: Path) -> tuple[Manifest, list[tuple[str, Path]], str]:
    """The record set's manifest, its (split, file)s, and its kind (paired or unpaired)."""
    upstream = Manifest.read(input_dir, stages=tuple(RECORD_FILES))
    files = [(split, input_dir / name) for name, split in RECORD_FILES[upstream.stage].items()]
    missing = [str(p) for _, p in files if not p.is_file()]
    if missing:
        raise UserError(f"{input_dir}: {', '.join(missing)} missing; re-run prefdata {upstream.stage}")
    kinds = {}
    for _, path in files:
        with parquet_read(path, f"re-run prefdata {upstream.stage}"):
            kinds[path.name] = record_kind(pq.ParquetFile(path).schema_arrow.names)
    if len(set(kinds.values())) > 1:
        listing = ", ".join(f"{name}: {kind}" for name, kind in kinds.items())
        raise UserError(f"{input_dir}: the record files mix paired and unpaired records ({listing}); re-run prefdata {upstream.stage}")
    return upstream, files, next(iter(kinds.values()))


def _batches(unit: tuple[str, int, str]) -> Iterator[pa.RecordBatch]:
    """One record file's batches of `rows`: the engine's read of one file."""
    path, rows, kind = unit
    columns = ["id", "prompt", *ANSWERS[kind], *(["label"] if kind == UNPAIRED else [])]
    return parquet_batches(Path(path), batch_size=rows, columns=columns)


def tokenize(config: TokenizeConfig) -> Manifest:
    check_output(config.out, [config.input_dir])  # before the input is fetched or the tokenizer loads
    with input_dirs([config.input_dir]) as (input_dir,):
        return _tokenize_local(config, input_dir)


def _tokenize_local(config: TokenizeConfig, input_dir: Path) -> Manifest:
    """The stage, on `config.input_dir`'s local copy `input_dir` (itself, when it is local)."""
    upstream, files, kind = _input_files(input_dir)
    total = sum(pq.ParquetFile(p).metadata.num_rows for _, p in files)
    if config.execution.engine == "local" and config.workers > 1 and total > config.batch_rows:
        # The workers' imports (this module, the fast tokenizer's) overlap the tokenizer load below.
        prestart([__name__, "transformers.tokenization_utils_tokenizers"])
    tokenizer = load_tokenizer(config.tokenizer)
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer {config.tokenizer} has no EOS token; completions must end with one")
    renderer = config.renderer(tokenizer)
    dropped: Counter = Counter()
    stats: Counter = Counter()
    read = kept = 0
    shards: list[ShardFile] = []
    dropped_rows: list[dict] = []
    labels: dict[str, Counter] = {}  # unpaired: desirable / undesirable rows kept per split
    with (
        output_dir(config.out, [config.input_dir]) as out_dir,
        progress("tokenize", total=total) as bar,
        session(config.execution) as engine,
        engine.pool(_encode_job, config.workers, _start_encoder, (tokenizer, config, kind)) as pool,
    ):
        for split, path in files:
            writer = ShardWriter(out_dir, split, config.rows_per_shard, SHARD_SCHEMA_OF[kind])
            kl = KlCompletions(split, config.max_length) if kind == UNPAIRED else None
            # Absolute: a Ray task's working directory is not this process's; a set fetched from an
            # object store is a copy on this process's node, which only its tasks can read.
            unit = (os.path.abspath(path), config.batch_rows, kind)
            for batch in pool.map_units([unit], _batches, here=is_uri(config.input_dir)):
                for table in kl.add(batch.table) if kl else [batch.table]:
                    writer.write(table)
                if kl:
                    desirable = pc.sum(batch.table.column("label")).as_py() or 0
                    labels.setdefault(split, Counter()).update(desirable=desirable, undesirable=batch.table.num_rows - desirable)
                dropped_rows += [{"split": split, **row} for row in batch.dropped]
                dropped.update(row["drop_reason"] for row in batch.dropped)
                stats.update(batch.stats)
                read += batch.read
                kept += batch.table.num_rows
                bar.advance(batch.read)
            if kl:
                kl.close()
                stats["truncated_kl_completions"] += kl.truncated
            shards += writer.close()
        pq.write_table(pa.Table.from_pylist(dropped_rows, schema=dropped_schema(kind)), out_dir / "dropped.parquet")
        per_kind = {"kl_rule": KL_RULE, "labels_per_split": {split: dict(n) for split, n in labels.items()}} if kind == UNPAIRED else {}
        manifest = Manifest(
            stage="tokenize",
            package_version=__version__,
            config=config.model_dump(),
            inputs=[InputFile(path=shown(p, [input_dir], [config.input_dir]), sha256=sha256_file(p), bytes=p.stat().st_size,
                              rows=pq.ParquetFile(p).metadata.num_rows) for _, p in files],
            counts=Counts(read=read, kept=kept, dropped=dict(dropped)),
            outputs=[s.name for s in shards] + ["dropped.parquet"],
            shards=shards,
            tokenizer=tokenizer_fingerprint(tokenizer, config.tokenizer),
            stats={"kind": kind, **renderer.describe(), "bos_prepended": renderer.add_bos_id, "upstream_stage": upstream.stage,
                   "rows_per_split": {s: sum(f.rows for f in shards if f.split == s) for s in dict.fromkeys(f.split for f in shards)},
                   **dict(stats), **per_kind},
            versions=_versions(),
        )
        manifest.write(out_dir)
    return manifest


def _versions() -> dict[str, str]:
    import tokenizers
    import transformers

    return {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__, "pyarrow": pa.__version__}


def summary_lines(manifest: Manifest) -> list[str]:
    c = manifest.counts
    lines = [f"tokenize: read {c.read}, kept {c.kept}, dropped {sum(c.dropped.values())} {json.dumps(c.dropped)}"]
    lines += [f"  {s.name}: {s.rows} rows" for s in manifest.shards]
    return lines
