"""`prefdata precompute-ref`: the reference model's log-probs, computed once, stored in the shards.

For every shard: read it memory-mapped, batch its rows by a token budget (longest first), score
chosen and rejected with `train.logprobs.sequence_logps` under `torch.inference_mode`, and rewrite
it with float32 `ref_chosen_logps` / `ref_rejected_logps` (SHARD_WITH_REF_SCHEMA), atomically.
An unpaired shard's completion and KL completion are scored the same way (they are its two
continuations, schemas.shard.TOKEN_COLUMNS) and stored as `ref_completion_logps` / `ref_kl_logps`.

Resuming. A shard is the unit of work. Before the finished file is renamed over the old one, a
marker `.precompute-ref/<shard>.json` records the new file's sha256 and the reference model:
    marker sha == file sha, same model   → done, skipped;
    file sha == manifest sha             → not done (killed before the rename, or never started);
    anything else                        → the file is corrupted or truncated: refused.
So kill -9 at any instant leaves every shard either old-and-valid or new-and-marked, and a re-run
scores only what is left. When all shards are done, the manifest (stage `precompute-ref`) is
written once and the markers are removed.

Many GPUs. Under `torchrun` rank r takes shards r, r+W, …; nothing is exchanged but a final
barrier, after which rank 0 writes the manifest.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import torch
from pydantic import BaseModel, ConfigDict, Field

from schemas.errors import UserError
from schemas.io import atomic_path, sha256_file, write_text_atomic
from schemas.location import local_only
from schemas.manifest import Counts, InputFile, Manifest, ModelFingerprint, ShardFile
from schemas.progress import progress
from schemas.shard import SCHEMAS, shard_kind
from train import parallel
from train.batching import Collator, TokenColumns, collate_pairs, token_budget_batches
from train.data import read_shard
from train.device import dtype_name, select_dtype
from train.distributed import Dist
from train.layouts import check_packing, prefix_sharing_exact
from train.logprobs import SequenceScorer, sequence_logps
from train.models import attention_kernel, check_fits, check_tokenizer, load_causal_lm, model_fingerprint, padding_id, same_weights
from train.models import model_dir as resolve_model_dir

MARKERS_DIR = ".precompute-ref"

# --verify: how far a row scored alone may differ from its batched value (atol, rtol). Batching
# changes only padding, so any gap is rounding: tiny in float32, a few hundredths per token in
# half precision, summed over hundreds of tokens.
VERIFY_TOLERANCE = {torch.float32: (1e-3, 1e-5), torch.float16: (0.25, 1e-2), torch.bfloat16: (1.0, 2e-2)}

# The trainer's step-0 check: how far the policy's re-score of an answer may be from the stored
# reference value, (nats per answer, nats per √token, nats per token). Rounding errors of half
# precision are mostly independent from token to token (each is one softmax's), so their sum grows
# as √tokens; a small bias per token remains (pure bf16 weights against fp32 under autocast, errors
# shared through the prompt's keys and values), hence a linear term well below the shift of
# another model (or a stale copy), which is off on every token: 0.05 nats per token is 25 nats on
# a 500-token answer, against 0.5 + 0.35·√500 + 0.01·500 ≈ 13.3 allowed in bfloat16.
REFERENCE_CHECK_TOLERANCE = {torch.float32: (1e-3, 1e-3, 0.0), torch.float16: (0.1, 0.1, 0.002),
                             torch.bfloat16: (0.5, 0.35, 0.01)}


def reference_check_tolerance(dtype: torch.dtype, tokens: np.ndarray) -> np.ndarray:
    """Nats allowed between a stored and a re-scored log-prob sum of answers of `tokens` tokens."""
    per_answer, per_root_token, per_token = REFERENCE_CHECK_TOLERANCE[dtype]
    tokens = np.asarray(tokens, dtype=np.float64)
    return per_answer + per_root_token * np.sqrt(tokens) + per_token * tokens


class PrecomputeRefConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shards: str = Field(description="Output of prefdata tokenize (shards + manifest.json).")
    model: str = Field(description="Reference model: a directory (save_pretrained) or Hub name.")
    device: Literal["auto", "cuda", "mps", "cpu"] = Field("auto", description="auto: CUDA if present, else MPS, else CPU.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on a GPU that has it, else float32.")
    batch_tokens: int = Field(16_384, gt=0, description="Padded tokens per forward pass (chosen + rejected rows).")
    parallelism: Literal["ddp", "fsdp"] = Field(
        "ddp", description="Under torchrun: ddp (each process a whole model, its own shards) or fsdp (the model sharded over "
        "the processes, for a reference too large for one device; every process scores a share of each shard).")
    prefix_sharing: Literal["auto", "off"] = Field(
        "auto", description="auto: each pair's prompt goes through the model once where that gives the same numbers "
        "(attention that takes a mask: sdpa, eager, flex_attention); off: two padded rows per pair.")
    packing: bool = Field(False, description="Padding-free: each batch is one row, its prefix-shared pairs back to "
                          "back, each attending only to itself; needs --prefix-sharing auto.")
    attn_implementation: str | None = Field(
        None, description="Passed to from_pretrained: sdpa, eager, flex_attention, … (default: flex_attention for --packing "
        "on CUDA, else transformers' default, sdpa).")
    verify: int = Field(0, ge=0, description="Re-score N random rows one at a time and compare with the batched values.")
    seed: int = Field(0, description="Which rows --verify picks.")
    force: bool = Field(False, description="Replace log-probs that another model (or dtype) wrote.")


class ShardScore(BaseModel):
    """A done-marker: what one shard became and what it took. Also the per-shard stats."""

    model_config = ConfigDict(extra="forbid")

    name: str
    sha256: str
    reference: ModelFingerprint
    rows: int
    real_tokens: int  # prompt twice and both answers (what an unshared pass computes)
    processed_tokens: int  # padded tokens the batches put through the model
    computed_tokens: int = 0  # non-padding tokens put through the model (real_tokens less the shared prompts)
    prefix_shared: bool = False
    seconds: float
    processes: int = 1  # that scored the shard together (FSDP: every process); tokens_per_s counts process-seconds
    verified_rows: int = 0
    verify_max_abs_diff: float = 0.0


@dataclass
class PrecomputeResult:
    manifest: Manifest
    scored: list[str] = field(default_factory=list)  # shards scored in this run, by any process
    skipped: list[str] = field(default_factory=list)  # shards found already done


# ---------------------------------------------------------------------------------------------
# The reference model: where it is, what it is, loading it


def _load_model(model_dir: Path, config: PrecomputeRefConfig, dtype: torch.dtype, compute_device: torch.device,
                load_device: torch.device, weights: bool = True) -> tuple[Any, Any]:
    """(the model in eval mode, its tokenizer)."""
    kernel = attention_kernel(config.attn_implementation, config.packing, compute_device)
    model, tokenizer = load_causal_lm(model_dir, config.model, dtype, load_device, kernel, weights)
    return model.eval(), tokenizer


def same_reference(a: ModelFingerprint | None, b: ModelFingerprint) -> bool:
    """Same weights and the same dtype: the same numbers (up to the device's rounding)."""
    return same_weights(a, b) and a.dtype == b.dtype


# ---------------------------------------------------------------------------------------------
# Ranks


# ---------------------------------------------------------------------------------------------
# One shard


def _marker_path(shards_dir: Path, name: str) -> Path:
    return shards_dir / MARKERS_DIR / f"{name}.json"


def _read_marker(shards_dir: Path, name: str) -> ShardScore | None:
    path = _marker_path(shards_dir, name)
    return ShardScore.model_validate_json(path.read_text()) if path.is_file() else None


def _needs_work(shards_dir: Path, shard: ShardFile, upstream: Manifest, reference: ModelFingerprint, force: bool) -> bool:
    """The state table of the module docstring; refuses a corrupted shard or another model's values."""
    path = shards_dir / shard.name
    if not path.is_file():
        raise UserError(f"{path}: shard listed in the manifest is missing; re-run prefdata tokenize")
    actual = sha256_file(path)
    marker = _read_marker(shards_dir, shard.name)
    if marker is not None and marker.sha256 == actual:
        if same_reference(marker.reference, reference) and not force:
            return False
        if not force:
            raise UserError(f"{path}: already holds reference log-probs of another model "
                            f"({marker.reference.name_or_path}, {marker.reference.dtype}); pass --force to replace them")
        return True
    if actual != shard.sha256:
        raise UserError(f"{path}: sha256 differs from the manifest (truncated or corrupted); re-run prefdata tokenize")
    return force or not (upstream.stage == "precompute-ref" and same_reference(upstream.reference, reference))


def _check_rows(path: Path, columns: TokenColumns, model: Any, name_or_path: str) -> None:
    check_fits(model, name_or_path, columns, str(path))
    if len(columns) and min(columns.prompt.lengths.min(), columns.chosen.lengths.min(), columns.rejected.lengths.min()) < 1:
        raise UserError(f"{path}: a row has an empty prompt or completion, which has no log-prob; re-run prefdata tokenize")


def _score_batches(model: Any, columns: TokenColumns, batches: list[tuple[np.ndarray, bool]], collate: Collator,
           device: torch.device, bar: Any) -> tuple[np.ndarray, np.ndarray]:
    """Log-probs of the rows of the batches that count; 0 elsewhere (other processes' rows)."""
    chosen = np.zeros(len(columns), dtype=np.float32)
    rejected = np.zeros(len(columns), dtype=np.float32)
    start, tokens = time.perf_counter(), 0
    for rows, counts in batches:
        batch = collate(columns, rows).to(device)
        out = sequence_logps(model, batch)
        if counts:
            chosen[rows], rejected[rows] = out.chosen.cpu().numpy(), out.rejected.cpu().numpy()
            tokens += batch.real_tokens
            bar.advance(len(rows), tok_s=f"{tokens / (time.perf_counter() - start):,.0f}")
    return chosen, rejected


def _verify(model: Any, columns: TokenColumns, rows: np.ndarray, batched: tuple[np.ndarray, np.ndarray],
            pad_id: int, device: torch.device, dtype: torch.dtype, path: Path, bucketed: bool = False) -> float:
    """Score `rows` one at a time in the padded layout (no padding but the FlexAttention tile's
    with `bucketed`) and compare with the batched values."""
    atol, rtol = VERIFY_TOLERANCE[dtype]
    worst = 0.0
    for row in rows:
        out = sequence_logps(model, collate_pairs(columns, np.array([row]), pad_id, bucketed=bucketed).to(device))
        for alone, stored in ((out.chosen.item(), batched[0][row]), (out.rejected.item(), batched[1][row])):
            diff = abs(alone - float(stored))
            worst = max(worst, diff)
            if diff > atol + rtol * abs(alone):
                raise UserError(f"{path}: --verify row {row}: batched {stored:.6g} vs alone {alone:.6g} ({dtype_name(dtype)}); "
                                "the model mishandles right padding, try another --attn-implementation (e.g. eager)")
    return worst


def _write_shard(shards_dir: Path, name: str, table: pa.Table, chosen: np.ndarray, rejected: np.ndarray,
                 score: ShardScore) -> ShardScore:
    schema, with_ref = SCHEMAS[shard_kind(table.schema)]  # the shard's kind: paired or unpaired
    base = [table.column(f.name) for f in schema]  # drops old ref columns under --force
    out = pa.Table.from_arrays([*base, pa.array(chosen, pa.float32()), pa.array(rejected, pa.float32())], schema=with_ref)
    with atomic_path(shards_dir / name) as tmp:
        with ipc.new_file(tmp, with_ref) as writer:
            writer.write_table(out)
        score = score.model_copy(update={"sha256": sha256_file(tmp)})
        # The marker goes first: a kill before the rename leaves old file + marker of a sha that
        # no file has, which reads as "not done" (see _needs_work).
        write_text_atomic(_marker_path(shards_dir, name), score.model_dump_json(indent=2) + "\n")
    return score


# ---------------------------------------------------------------------------------------------
# The stage


def _verify_picks(shards: list[ShardFile], n: int, seed: int) -> dict[str, np.ndarray]:
    """n distinct rows drawn over all shards (the same draw on every rank), grouped by shard."""
    bounds = np.cumsum([0] + [s.rows for s in shards])
    picks = np.sort(np.random.default_rng(seed).choice(bounds[-1], size=min(n, int(bounds[-1])), replace=False))
    return {s.name: picks[(picks >= lo) & (picks < hi)] - lo for s, lo, hi in zip(shards, bounds[:-1], bounds[1:])}


class _LazyReference:
    """The model, loaded the first time a shard needs it (a finished re-run never loads it).
    Under FSDP it is sharded over the processes, which then score each shard together."""

    def __init__(self, model_dir: Path, config: PrecomputeRefConfig, dtype: torch.dtype, device: torch.device,
                 ranks: Dist) -> None:
        self.model_dir, self.config, self.dtype, self.device, self.ranks = model_dir, config, dtype, device, ranks
        self.sharded = config.parallelism == "fsdp"
        self._model: Any = None
        self._scoring: Any = None
        self.pad_id = 0

    @property
    def model(self) -> Any:
        if self._model is None:
            self._model, tokenizer = _load_model(self.model_dir, self.config, self.dtype, self.device,
                                                 torch.device("cpu") if self.sharded else self.device,
                                                 parallel.loads_weights(self.ranks, self.config.parallelism))
            self.pad_id = padding_id(tokenizer)
            self._scoring = self._model
            if self.sharded:  # weights already in the reference dtype: no mixed-precision policy
                self._scoring = parallel.shard(SequenceScorer(self._model), self._model, self.device, None, False, self.ranks)
        return self._model

    def score_shard(self, shards_dir: Path, name: str, verify_rows: np.ndarray, reference: ModelFingerprint,
                    bar: Any) -> ShardScore | None:
        """Scores one shard; the process that writes it (each its own, or rank 0 under FSDP)
        returns its marker."""
        path = shards_dir / name
        table = read_shard(path)
        columns = TokenColumns.from_table(table)
        _check_rows(path, columns, self.model, self.config.model)
        # Prefix sharing where exact; --verify then re-scores rows alone in the padded layout.
        shared = self.config.prefix_sharing == "auto" and prefix_sharing_exact(self.model, columns.pair_lengths)
        check_packing(self.config.packing, shared, self.config.prefix_sharing, self.model, columns.pair_lengths)
        collate = Collator(self.pad_id, shared, packed=shared and self.config.packing,
                           bucketed=self.model.config._attn_implementation == "flex_attention")
        lengths, rows_per_pair = collate.batch_lengths(columns)
        batches = token_budget_batches(lengths, self.config.batch_tokens, rows_per_pair)
        shares = parallel.equal_shares(batches, self.ranks, True) if self.sharded else [(rows, True) for rows in batches]
        start = time.perf_counter()
        # no_grad, not inference_mode: FSDP re-gathers into buffers it allocated in earlier forwards.
        with torch.no_grad():
            chosen, rejected = _score_batches(self._scoring, columns, shares, collate, self.device, bar)
            if self.sharded:  # each row was scored by one process, the others hold 0 there
                chosen, rejected = (self.ranks.sum(torch.from_numpy(v)).numpy() for v in (chosen, rejected))
                bar.advance(len(columns) - sum(len(rows) for rows, counts in shares if counts))  # the others' rows
            seconds = time.perf_counter() - start
            worst = _verify(self._scoring, columns, verify_rows, (chosen, rejected), self.pad_id, self.device, self.dtype, path,
                            collate.bucketed)
        if self.sharded and not self.ranks.is_main:
            return None
        real = columns.real_tokens
        computed = columns.shared_lengths if shared else real
        score = ShardScore(name=name, sha256="", reference=reference, rows=len(columns), real_tokens=int(real.sum()),
                           processed_tokens=collate.processed_tokens(lengths, batches, rows_per_pair),
                           computed_tokens=int(computed.sum()), prefix_shared=shared,
                           seconds=seconds, processes=self.ranks.world if self.sharded else 1,
                           verified_rows=len(verify_rows), verify_max_abs_diff=worst)
        return _write_shard(shards_dir, name, table, chosen, rejected, score)


def precompute_ref(config: PrecomputeRefConfig) -> PrecomputeResult:
    local_only("precompute-ref", {"SHARDS": config.shards})
    shards_dir = Path(config.shards)
    upstream = Manifest.read(shards_dir, stages=("tokenize", "precompute-ref"))
    if not upstream.shards or upstream.tokenizer is None:
        raise UserError(f"{shards_dir}: the manifest lists no shards or no tokenizer; re-run prefdata tokenize")
    # The timeout is long because a rank with shorter shards waits at the last barrier for the
    # others; a crashed rank does not leave the rest hanging, since torchrun stops every worker
    # when one fails.
    ranks = Dist.start(config.device, timedelta(days=1))
    device = ranks.device
    dtype = select_dtype(config.dtype, device)
    model_dir = resolve_model_dir(config.model)
    reference = model_fingerprint(model_dir, config.model, dtype, device)
    if upstream.stage == "precompute-ref" and not same_reference(upstream.reference, reference) and not config.force:
        raise UserError(f"{shards_dir}: already holds reference log-probs of {upstream.reference.name_or_path} "
                        f"({upstream.reference.dtype}); pass --force to replace them with {config.model}")
    check_tokenizer(model_dir, config.model, upstream.tokenizer)

    mine = upstream.shards if config.parallelism == "fsdp" else upstream.shards[ranks.rank :: ranks.world]
    todo = [s for s in mine if _needs_work(shards_dir, s, upstream, reference, config.force)]
    ranks.barrier()  # every process has read the shards' state before any is rewritten
    result = PrecomputeResult(upstream, skipped=[s.name for s in mine if s not in todo])
    picks = _verify_picks(upstream.shards, config.verify, config.seed)
    scorer = _LazyReference(model_dir, config, dtype, device, ranks)
    for shard in todo:  # a kill -9 leaves its atomic_path temp file behind
        for stale in shards_dir.glob(f".tmp-{shard.name}.*"):
            stale.unlink(missing_ok=True)  # under FSDP every process clears the same files
    if todo:
        with progress("precompute-ref", total=sum(s.rows for s in todo)) as bar:
            for shard in todo:
                scorer.score_shard(shards_dir, shard.name, picks[shard.name], reference, bar)
                result.scored.append(shard.name)
    if config.parallelism != "fsdp":  # each process had shards of its own: the run's report counts all of them
        order = {shard.name: i for i, shard in enumerate(upstream.shards)}
        everyone = ranks.gather_objects((result.scored, result.skipped))
        result.scored, result.skipped = (sorted(sum((names[part] for names in everyone), []), key=order.get) for part in (0, 1))
    ranks.barrier()
    if ranks.rank == 0 and (shards_dir / MARKERS_DIR).is_dir():
        _final_manifest(shards_dir, upstream, config, reference).write(shards_dir)
        shutil.rmtree(shards_dir / MARKERS_DIR)
    ranks.barrier()
    result.manifest = Manifest.read(shards_dir)
    return result


def _final_manifest(shards_dir: Path, upstream: Manifest, config: PrecomputeRefConfig,
                    reference: ModelFingerprint) -> Manifest:
    """Shards scored since the last manifest take their marker's sha and stats; the others (already
    holding this model's values) keep the upstream manifest's."""
    upstream_stats = upstream.stats.get("shards", {})
    shards, per_shard = [], {}
    for shard in upstream.shards:
        marker = _read_marker(shards_dir, shard.name)
        if marker is not None and same_reference(marker.reference, reference):
            shards.append(shard.model_copy(update={"sha256": marker.sha256}))
            per_shard[shard.name] = marker.model_dump(exclude={"name", "sha256", "reference"})
        else:
            shards.append(shard)
            per_shard[shard.name] = upstream_stats[shard.name]
    rows = sum(s.rows for s in shards)
    real = sum(s["real_tokens"] for s in per_shard.values())
    process_seconds = sum(s["seconds"] * s.get("processes", 1) for s in per_shard.values())
    import transformers

    return Manifest(
        stage="precompute-ref",
        package_version=upstream.package_version,
        config=config.model_dump(),
        inputs=[InputFile(path=s.name, sha256=s.sha256, rows=s.rows) for s in upstream.shards],
        counts=Counts(read=rows, kept=rows),
        outputs=upstream.outputs,
        shards=shards,
        tokenizer=upstream.tokenizer,
        reference=reference,
        stats={
            "rows": rows,
            "real_tokens": real,
            # non-padding share of what went through the model (shards scored before prefix sharing: real tokens)
            "padding_efficiency": sum(s.get("computed_tokens") or s["real_tokens"] for s in per_shard.values())
            / max(1, sum(s["processed_tokens"] for s in per_shard.values())),
            "prefix_shared_shards": sum(bool(s.get("prefix_shared")) for s in per_shard.values()),
            "tokens_per_s": real / process_seconds if process_seconds else None,  # per process: over process-seconds
            "verified_rows": sum(s["verified_rows"] for s in per_shard.values()),
            "verify_max_abs_diff": max(s["verify_max_abs_diff"] for s in per_shard.values()),
            "shards": per_shard,
            # The tokenize stage's settings and drop counts, which this manifest replaces.
            "tokenize": upstream.stats.get("tokenize") or {"config": upstream.config, "counts": upstream.counts.model_dump(),
                                                           "stats": upstream.stats},
        },
        versions={**upstream.versions, "torch": torch.__version__, "transformers": transformers.__version__},
    )


def summary_lines(result: PrecomputeResult) -> list[str]:
    stats, ref = result.manifest.stats, result.manifest.reference
    if not result.scored:
        return [f"precompute-ref: nothing to do; {len(result.skipped)} shard(s) already hold log-probs of "
                f"{ref.name_or_path if ref else '?'}"]
    return [f"precompute-ref: scored {len(result.scored)} shard(s), {len(result.skipped)} already done; "
            f"{stats['rows']} rows, {stats['tokens_per_s']:,.0f} tokens/s per process, padding efficiency "
            f"{stats['padding_efficiency']:.1%}, reference {ref.name_or_path} ({ref.dtype} on {ref.device_type})"]

