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
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator

from prefdata import __version__
from prefdata.pool import OrderedPool, prestart
from schemas.cpus import usable_cpus
from schemas.errors import UserError
from schemas.fingerprint import tokenizer_fingerprint
from schemas.io import atomic_dir, sha256_file
from schemas.manifest import Counts, InputFile, Manifest, ShardFile
from schemas.progress import progress
from schemas.records import RECORD_FILES, prompt_hash
from schemas.render import CHAT_TEMPLATE_KWARGS_HELP, ChatTemplateKwargs, Renderer, SystemTurn, make_renderer
from schemas.shard import SHARD_SCHEMA, shard_name

TOO_LONG = "too_long"
EMPTY_AFTER_TRUNCATION = "empty_after_truncation"
IDENTICAL_AFTER_TRUNCATION = "identical_after_truncation"
# Different answers the template renders alike (a DeepSeek-R1 template strips the reasoning before
# `</think>`): a pair with nothing left to prefer, which curate cannot see in the raw texts.
IDENTICAL_AFTER_RENDERING = "identical_after_rendering"


def prompt_length_limit(max_length: int, max_prompt_length: int | None) -> int:
    """--max-prompt-length as given, else half of --max-length: a fixed default would refuse
    `--max-length` at or below it, and half leaves the answers as much room as the prompt."""
    return max_prompt_length if max_prompt_length is not None else max_length // 2


class TokenizeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_dir: str = Field(description="Output of prefdata curate (train/eval) or prefdata ingest.")
    tokenizer: str = Field(description="Tokenizer directory or Hub name (offline: a directory).")
    out: str = Field(description="Directory for the shards, dropped.parquet and manifest.json.")
    template: Literal["auto", "chat", "plain"] = Field("auto", description="auto: the tokenizer's chat template if it has one, else plain.")
    chat_template_kwargs: ChatTemplateKwargs = Field({}, description=CHAT_TEMPLATE_KWARGS_HELP)
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

    @model_validator(mode="after")
    def _lengths(self) -> TokenizeConfig:
        self.max_prompt_length = prompt_length_limit(self.max_length, self.max_prompt_length)
        if self.max_prompt_length >= self.max_length:
            raise UserError(
                f"--max-prompt-length ({self.max_prompt_length}) must be smaller than --max-length "
                f"({self.max_length}): completions need room"
            )
        return self


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
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load tokenizer {name_or_path}: {first_line}") from None


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
    """Token ids of one batch plus a drop reason per row (None = kept)."""

    def __init__(self, size: int) -> None:
        self.prompt: list[list[int]] = [[] for _ in range(size)]
        self.chosen: list[list[int]] = [[] for _ in range(size)]
        self.rejected: list[list[int]] = [[] for _ in range(size)]
        self.prompt_id: list[str] = [""] * size
        self.reason: list[str | None] = [None] * size


def encode_batch(rows: list[dict], renderer: Renderer, encode: Any) -> _Encoded:
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
    chosen = renderer.completions(prompts, prompt_texts, [r["chosen"] for r in rows])
    rejected = renderer.completions(prompts, prompt_texts, [r["rejected"] for r in rows])
    out = _Encoded(len(rows))
    out.prompt_id = [distinct_hashes[j] for j in which]
    out.reason = [distinct_prompts.reasons[j] or c or r for j, c, r in zip(which, chosen.reasons, rejected.reasons)]
    ok = [i for i, reason in enumerate(out.reason) if reason is None]
    bos = [renderer.tokenizer.bos_token_id] if renderer.add_bos_id else []
    end = renderer.appended_ids  # EOS only where the template renders no end of turn of its own
    for i, c, r in zip(ok, encode([chosen.texts[i] for i in ok]), encode([rejected.texts[i] for i in ok])):
        out.prompt[i], out.chosen[i], out.rejected[i] = bos + distinct_ids[which[i]], c + end, r + end
        if c == r:
            out.reason[i] = IDENTICAL_AFTER_RENDERING
    return out


def apply_length_policy(enc: _Encoded, config: TokenizeConfig, bos_id: int | None, stats: Counter) -> None:
    """Mark rows that do not fit as `too_long`, or truncate them in place (`--overflow truncate`)."""
    p = np.fromiter((len(x) for x in enc.prompt), dtype=np.int64, count=len(enc.prompt))
    c = np.fromiter((len(x) for x in enc.chosen), dtype=np.int64, count=len(enc.chosen))
    r = np.fromiter((len(x) for x in enc.rejected), dtype=np.int64, count=len(enc.rejected))
    alive = np.array([reason is None for reason in enc.reason], dtype=bool)
    overflow = alive & ((p > config.max_prompt_length) | (p + np.maximum(c, r) > config.max_length))
    for i in np.flatnonzero(overflow):
        if config.overflow == "drop":
            enc.reason[i] = TOO_LONG
        else:
            _truncate_row(enc, int(i), config, bos_id, stats)


def _truncate_row(enc: _Encoded, i: int, config: TokenizeConfig, bos_id: int | None, stats: Counter) -> None:
    prompt = enc.prompt[i]
    if len(prompt) > config.max_prompt_length:
        keep_bos = bos_id is not None and prompt[0] == bos_id
        head = prompt[:1] if keep_bos else []
        prompt = head + prompt[len(prompt) - (config.max_prompt_length - len(head)):]
        stats["truncated_prompts"] += 1
    room = config.max_length - len(prompt)
    chosen, rejected = enc.chosen[i][:room], enc.rejected[i][:room]
    stats["truncated_completions"] += int(len(chosen) < len(enc.chosen[i])) + int(len(rejected) < len(enc.rejected[i]))
    enc.prompt[i], enc.chosen[i], enc.rejected[i] = prompt, chosen, rejected
    if not chosen or not rejected:
        enc.reason[i] = EMPTY_AFTER_TRUNCATION
    elif chosen == rejected:
        enc.reason[i] = IDENTICAL_AFTER_TRUNCATION


# ---------------------------------------------------------------------------------------------
# Shard writing


class ShardWriter:
    """Arrow IPC *file* format shards of at most `rows_per_shard` rows, named by split."""

    def __init__(self, out_dir: Path, split: str, rows_per_shard: int) -> None:
        self.out_dir, self.split, self.rows_per_shard = out_dir, split, rows_per_shard
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
        self._writer = ipc.new_file(self.out_dir / name, SHARD_SCHEMA)
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


def _shard_table(rows: list[dict], enc: _Encoded, keep: list[int]) -> pa.Table:
    ids = pa.list_(pa.int32())
    return pa.table(
        {
            "id": pa.array([rows[i]["id"] for i in keep], pa.string()),
            "prompt_id": pa.array([enc.prompt_id[i] for i in keep], pa.string()),
            "prompt_input_ids": pa.array([enc.prompt[i] for i in keep], ids),
            "chosen_input_ids": pa.array([enc.chosen[i] for i in keep], ids),
            "rejected_input_ids": pa.array([enc.rejected[i] for i in keep], ids),
        },
        schema=SHARD_SCHEMA,
    )


TOKENIZE_DROPPED_SCHEMA = pa.schema([("id", pa.string()), ("split", pa.string()), ("drop_reason", pa.string()),
                            ("prompt_tokens", pa.int64()), ("chosen_tokens", pa.int64()), ("rejected_tokens", pa.int64())])


# ---------------------------------------------------------------------------------------------
# One batch of records, the unit of work of the process pool


class TokenizedBatch(NamedTuple):
    read: int
    table: pa.Table  # the kept rows, in SHARD_SCHEMA
    dropped: list[dict]  # TOKENIZE_DROPPED_SCHEMA rows without their split
    stats: Counter  # token and truncation counts


class PairEncoder:
    """Records → shard rows and drops: rendering, batch encoding and the length policy. Built once
    per process (the pool's initializer), then called on every batch."""

    def __init__(self, tokenizer: Any, config: TokenizeConfig) -> None:
        self.renderer = make_renderer(tokenizer, config.template, config.chat_template_kwargs, config.system_turn)
        self.encode = batch_encoder(tokenizer)
        self.config = config
        self.bos_id = tokenizer.bos_token_id

    def __call__(self, batch: pa.RecordBatch) -> TokenizedBatch:
        rows = batch.to_pylist()
        enc = encode_batch(rows, self.renderer, self.encode)
        stats: Counter = Counter()
        apply_length_policy(enc, self.config, self.bos_id, stats)
        keep = [i for i, reason in enumerate(enc.reason) if reason is None]
        dropped = [{"id": rows[i]["id"], "drop_reason": reason, "prompt_tokens": len(enc.prompt[i]),
                    "chosen_tokens": len(enc.chosen[i]), "rejected_tokens": len(enc.rejected[i])}
                   for i, reason in enumerate(enc.reason) if reason is not None]
        if not self.renderer.system_role and self.config.system_turn == "fold":
            stats["system_turns_folded"] += sum(rows[i]["prompt"][0]["role"] == "system" for i in keep)
        stats["prompt_tokens"] += sum(len(enc.prompt[i]) for i in keep)
        stats["completion_tokens"] += sum(len(enc.chosen[i]) + len(enc.rejected[i]) for i in keep)
        return TokenizedBatch(len(rows), _shard_table(rows, enc, keep), dropped, stats)


_encoder: PairEncoder | None = None  # this process's, set by _start_encoder


def _start_encoder(tokenizer: Any, config: TokenizeConfig) -> None:
    global _encoder
    _encoder = PairEncoder(tokenizer, config)


def _encode_job(batch: pa.RecordBatch) -> TokenizedBatch:
    return _encoder(batch)


# ---------------------------------------------------------------------------------------------
# The stage


def _input_files(input_dir: Path) -> tuple[Manifest, list[tuple[str, Path]]]:
    upstream = Manifest.read(input_dir, stages=tuple(RECORD_FILES))
    files = [(split, input_dir / name) for name, split in RECORD_FILES[upstream.stage].items()]
    missing = [str(p) for _, p in files if not p.is_file()]
    if missing:
        raise UserError(f"{input_dir}: {', '.join(missing)} missing; re-run prefdata {upstream.stage}")
    return upstream, files


def _batches(path: Path, rows: int) -> Iterator[pa.RecordBatch]:
    return pq.ParquetFile(path).iter_batches(batch_size=rows, columns=["id", "prompt", "chosen", "rejected"])


def tokenize(config: TokenizeConfig) -> Manifest:
    input_dir = Path(config.input_dir)
    upstream, files = _input_files(input_dir)
    total = sum(pq.ParquetFile(p).metadata.num_rows for _, p in files)
    if config.workers > 1 and total > config.batch_rows:
        # The workers' imports (this module, the fast tokenizer's) overlap the tokenizer load below.
        prestart([__name__, "transformers.tokenization_utils_tokenizers"])
    tokenizer = load_tokenizer(config.tokenizer)
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer {config.tokenizer} has no EOS token; completions must end with one")
    renderer = make_renderer(tokenizer, config.template, config.chat_template_kwargs, config.system_turn)
    dropped: Counter = Counter()
    stats: Counter = Counter()
    read = kept = 0
    shards: list[ShardFile] = []
    dropped_rows: list[dict] = []
    with (
        atomic_dir(config.out) as out_dir,
        progress("tokenize", total=total) as bar,
        OrderedPool(_encode_job, config.workers, _start_encoder, (tokenizer, config)) as pool,
    ):
        for split, path in files:
            writer = ShardWriter(out_dir, split, config.rows_per_shard)
            for batch in pool.map(_batches(path, config.batch_rows)):
                writer.write(batch.table)
                dropped_rows += [{"split": split, **row} for row in batch.dropped]
                dropped.update(row["drop_reason"] for row in batch.dropped)
                stats.update(batch.stats)
                read += batch.read
                kept += batch.table.num_rows
                bar.advance(batch.read)
            shards += writer.close()
        pq.write_table(pa.Table.from_pylist(dropped_rows, schema=TOKENIZE_DROPPED_SCHEMA), out_dir / "dropped.parquet")
        manifest = Manifest(
            stage="tokenize",
            package_version=__version__,
            config=config.model_dump(),
            inputs=[InputFile(path=str(p), sha256=sha256_file(p), bytes=p.stat().st_size, rows=pq.ParquetFile(p).metadata.num_rows)
                    for _, p in files],
            counts=Counts(read=read, kept=kept, dropped=dict(dropped)),
            outputs=[s.name for s in shards] + ["dropped.parquet"],
            shards=shards,
            tokenizer=tokenizer_fingerprint(tokenizer, config.tokenizer),
            stats={**renderer.describe(), "bos_prepended": renderer.add_bos_id, "upstream_stage": upstream.stage,
                   "rows_per_split": {s: sum(f.rows for f in shards if f.split == s) for s in dict.fromkeys(f.split for f in shards)},
                   **dict(stats)},
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
