"""`prefdata generate`: K answers per prompt sampled from a policy, for on-policy preference data.

    prompts ──render (the policy tokenizer's chat template, as tokenize does)──▶ ids
            ──sorted by length, cut into chunks of `chunk_prompts`──▶ batched `model.generate`
            ──▶ OUT/chunks/chunk-NNNNN.jsonl (each written atomically) ──▶ OUT/generations.jsonl

Each chunk is sampled under its own seed, derived from (`seed`, chunk number) by numpy's
SeedSequence, so a killed run that resumes from its finished chunks writes the same file as an
uninterrupted one (on the same hardware and library versions: sampling on a GPU is not bitwise
reproducible across them). Prompts are sorted by token length first, so a batch pads little.

A response ends at the first stop token (the template's end of turn, the tokenizer's EOS and the
model's generation-config EOS ids: schemas.render.stop_token_ids, as eval stops);
one that reached `max_new_tokens` first has `finish_reason: "length"`, and ingest leaves
it out unless told otherwise (prefdata.formats.judged). Generation runs on `transformers`.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.errors import UserError, first_line
from schemas.io import read_utf8, sha256_file, write_text_atomic
from schemas.location import check_apart, local_only
from schemas.manifest import Counts, InputFile, Manifest, package_version
from schemas.progress import progress
from schemas.records import RECORD_FILES, Message, prompt_hash
from schemas.render import (
    CHAT_TEMPLATE_KWARGS_HELP,
    SPECIAL_TOKEN_IN_TEXT,
    ChatTemplateKwargs,
    check_template_kwargs,
    make_renderer,
    prompt_token_ids,
    stop_token_ids,
)
from train.device import select_dtype
from train.distributed import Dist
from train.models import load_causal_lm, model_dir, model_fingerprint, padding_id

GENERATIONS_FILE = "generations.jsonl"
CHUNKS_DIR = "chunks"
INVALID_PROMPT = "invalid_prompt"
DUPLICATE_PROMPT = "duplicate_prompt"
EXCLUDED_PROMPT = "excluded_prompt"  # asked by --exclude-prompts (an earlier round's prompts)
OVER_MAX_PROMPTS = "over_max_prompts"
PROMPT_TOO_LONG = "prompt_too_long"  # with --max-new-tokens, beyond the model's positions


class GenerateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompts: str = Field(description="A record set (ingest/curate output), a shard directory, a .parquet of records, "
                         "a .jsonl of {\"prompt\": text or messages}, or a .txt with one prompt per line.")
    policy: str = Field(description="The model that answers: a directory (save_pretrained) or Hub name.")
    out: str = Field(description="Directory for generations.jsonl and manifest.json.")
    n: int = Field(4, gt=0, description="Answers sampled per distinct prompt.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: keep the smallest set of tokens whose "
                         "probability reaches this (1 = off).")
    max_new_tokens: int = Field(256, gt=0, description="Longest answer; longer ones are cut and marked.")
    seed: int = Field(0, description="Sampling seed (each chunk's seed derives from it).")
    batch_size: int = Field(64, gt=0, description="Most prompts per generate call (each gives n sequences).")
    batch_tokens: int = Field(32_768, gt=0, description="Most tokens per generate call: prompts × n × (longest prompt + "
                              "max_new_tokens); long prompts go in smaller batches.")
    max_prompts: int | None = Field(None, gt=0, description="Use the first N distinct prompts.")
    split: Literal["train", "eval", "all"] = Field("train", description="Which split of a curated record set.")
    exclude_prompts: list[str] = Field([], description="generations.jsonl files whose prompts are skipped "
                                       "(earlier rounds of prefdata iterate).")
    template: Literal["auto", "chat", "plain"] = Field("auto", description="Prompt rendering, as in prefdata tokenize.")
    chat_template_kwargs: ChatTemplateKwargs = Field({}, description=CHAT_TEMPLATE_KWARGS_HELP)
    chunk_prompts: int = Field(256, gt=0, description="Prompts per resumable chunk.")
    device: str = Field("auto", description="auto, cuda, mps or cpu.")
    dtype: str = Field("auto", description="auto (bfloat16 on a GPU that has it, else float32), float32, bfloat16, float16.")


# ---------------------------------------------------------------------------------------------
# Prompts


def shard_tokenize_config(manifest: Manifest) -> dict[str, Any]:
    """The tokenize config shards were made with (a precompute-ref manifest carries it along)."""
    return manifest.config if manifest.stage == "tokenize" else manifest.stats.get("tokenize", {}).get("config", {})


def record_files(directory: Path, split: str) -> list[Path]:
    manifest = Manifest.read(directory)
    if manifest.stage in ("tokenize", "precompute-ref"):
        # Shards hold prompt ids, not messages: take the record set they were tokenized from.
        tokenize_config = shard_tokenize_config(manifest)
        records = Path(tokenize_config.get("input_dir", ""))
        if not (records / "manifest.json").is_file():
            raise UserError(f"{directory}: the record set these shards were tokenized from ({records}) is not at hand; "
                            "pass a record set instead")
        return record_files(records, split)
    if manifest.stage not in RECORD_FILES:
        raise UserError(f"{directory}: a {manifest.stage} output; generate takes a record set, shards, or a prompt file")
    return [directory / name for name, part in RECORD_FILES[manifest.stage].items()
            if split == "all" or part == split or manifest.stage == "ingest"]


PROMPT_FILES = "prompts are a record set, a .parquet with a prompt column, UTF-8 .jsonl of {\"prompt\": ...} or .txt lines"


def _parquet_prompts(path: Path) -> list[Any]:
    try:
        return pq.read_table(path, columns=["prompt"]).column("prompt").to_pylist()
    except (OSError, ValueError, KeyError) as exc:  # ArrowInvalid is a ValueError: not parquet, or no prompt column
        raise UserError(f"{path}: cannot read its prompt column ({first_line(exc)}); {PROMPT_FILES}") from None


def _jsonl_prompts(path: Path) -> list[Any]:
    prompts = []
    for number, line in enumerate(read_utf8(path, PROMPT_FILES).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}: not JSON ({exc.msg}); one {{\"prompt\": ...}} object per line") from None
        prompts.append(row.get("prompt") if isinstance(row, dict) else None)
    return prompts


def raw_prompts(path_text: str, split: str) -> tuple[list[Any], list[InputFile]]:
    """Every prompt of the input as read (messages, text, or anything invalid), and the files read."""
    path = Path(path_text)
    if path.is_dir():
        files = record_files(path, split)
    elif path.suffix in (".parquet", ".jsonl", ".txt"):
        files = [path]
    else:
        raise UserError(f"{path_text}: not a record set directory, .parquet, .jsonl or .txt file")
    prompts: list[Any] = []
    for file in files:
        if not file.is_file():
            raise UserError(f"{file}: no such file")
        if file.suffix == ".parquet":
            prompts += _parquet_prompts(file)
        elif file.suffix == ".jsonl":
            prompts += _jsonl_prompts(file)
        else:
            prompts += [line for line in read_utf8(file, PROMPT_FILES).splitlines() if line.strip()]
    inputs = [InputFile(path=str(f), sha256=sha256_file(f), bytes=f.stat().st_size) for f in files]
    return prompts, inputs


def as_messages(prompt: Any) -> list[dict[str, str]] | None:
    """Validated, normalised prompt messages ending with a user turn; None if it is not one."""
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    try:
        messages = [Message.model_validate(m).model_dump() for m in prompt]
    except (ValidationError, TypeError):
        return None
    return messages if messages and messages[-1]["role"] == "user" else None


def seen_prompt_ids(files: list[str]) -> set[str]:
    seen = set()
    for file in files:
        with open(file, encoding="utf-8") as fh:
            seen.update(json.loads(line)["prompt_id"] for line in fh if line.strip())
    return seen


def distinct_prompts(raw: list[Any], exclude: set[str], max_prompts: int | None) -> tuple[list[list[dict]], Counter]:
    """The distinct valid prompts in first-seen order, and what was left out by reason."""
    kept: dict[str, list[dict]] = {}
    dropped: Counter = Counter()
    for prompt in raw:
        messages = as_messages(prompt)
        key = None if messages is None else prompt_hash(messages)
        reason = (INVALID_PROMPT if messages is None else DUPLICATE_PROMPT if key in kept
                  else EXCLUDED_PROMPT if key in exclude
                  else OVER_MAX_PROMPTS if max_prompts is not None and len(kept) >= max_prompts else None)
        if reason:
            dropped[reason] += 1
        else:
            kept[key] = messages
    return list(kept.values()), dropped


# ---------------------------------------------------------------------------------------------
# Sampling


def sample_completions(model: Any, prompts: list[np.ndarray], n: int, temperature: float, top_p: float,
                       max_new_tokens: int, stop_ids: list[int], pad_id: int) -> list[np.ndarray]:
    """`n` completions per prompt (prompt-major), each cut after its first stop token (kept); one
    without a stop token reached `max_new_tokens`. One `generate` call, prompts left-padded so
    every row continues from the last column."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):] = torch.as_tensor(np.asarray(prompt, dtype=np.int64))
        mask[i, width - len(prompt):] = 1
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                         temperature=temperature, top_k=0, top_p=top_p, max_new_tokens=max_new_tokens,
                         num_return_sequences=n, eos_token_id=stop_ids, pad_token_id=pad_id)
    completions = []
    for row in out[:, width:].cpu().numpy():
        ends = np.flatnonzero(np.isin(row, stop_ids))
        completions.append(row[: ends[0] + 1] if len(ends) else row)
    return completions


def chunk_seed(seed: int, chunk: int) -> int:
    return int(np.random.SeedSequence([seed, chunk]).generate_state(1)[0])


class Sampling(NamedTuple):
    n: int
    temperature: float
    top_p: float
    max_new_tokens: int
    batch_size: int
    batch_tokens: int


def generation_batches(lengths: list[int], sampling: Sampling) -> list[range]:
    """Consecutive prompts (sorted by length) per generate call: at most `batch_size`, and at most
    `batch_tokens` of prompt-plus-answer tokens over the n sequences, at least one. On a CPU a
    batch of long prompts costs more per token than the same prompts alone (the attention over the
    padded cache), so the budget, not the count, bounds them."""
    batches, start = [], 0
    while start < len(lengths):
        end, longest = start + 1, lengths[start]
        while end < len(lengths) and end - start < sampling.batch_size:
            longest = max(longest, lengths[end])
            if (end - start + 1) * sampling.n * (longest + sampling.max_new_tokens) > sampling.batch_tokens:
                break
            end += 1
        batches.append(range(start, end))
        start = end
    return batches


def answer_prompts(model: Any, tokenizer: Any, ids: list[list[int]], sampling: Sampling, stop_ids: list[int]) -> list[list[dict]]:
    """`sampling.n` answers to each prompt (token ids, as `prompt_token_ids` renders them), each
    ending at the first of `stop_ids`: per prompt, a list of {"text", "finish_reason", "tokens"}."""
    pad_id = padding_id(tokenizer)
    answers = []
    for rows in generation_batches([len(i) for i in ids], sampling):
        batch = [np.asarray(ids[i]) for i in rows]
        completions = sample_completions(model, batch, sampling.n, sampling.temperature, sampling.top_p,
                                         sampling.max_new_tokens, stop_ids, pad_id)
        texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
        stopped = [bool(np.isin(c[-1:], stop_ids).any()) for c in completions]
        responses = [{"text": t.strip(), "finish_reason": "stop" if s else "length", "tokens": len(c)}
                     for t, s, c in zip(texts, stopped, completions)]
        answers += [responses[j * sampling.n:(j + 1) * sampling.n] for j in range(len(batch))]
    return answers


def _chunk_lines(model: Any, tokenizer: Any, prompts: list[list[dict]], ids: list[list[int]],
                 config: GenerateConfig, stop_ids: list[int]) -> tuple[list[str], int]:
    """One JSON line per prompt of the chunk, with its `n` answers; and the tokens generated."""
    sampling = Sampling(config.n, config.temperature, config.top_p, config.max_new_tokens, config.batch_size,
                        config.batch_tokens)
    answers = answer_prompts(model, tokenizer, ids, sampling, stop_ids)
    lines = [json.dumps({"prompt_id": prompt_hash(prompt), "prompt": prompt, "responses": responses,
                         "policy": config.policy}, ensure_ascii=False) + "\n" for prompt, responses in zip(prompts, answers)]
    return lines, sum(r["tokens"] for responses in answers for r in responses)


# ---------------------------------------------------------------------------------------------
# The stage


def generate(config: GenerateConfig) -> Manifest:
    local_only("generate", {"PROMPTS": config.prompts, "--out": config.out})
    check_apart(config.out, [config.prompts, config.policy])
    out = Path(config.out)
    if (out / GENERATIONS_FILE).is_file() and (out / "manifest.json").is_file():
        return Manifest.read(out, stages=("generate",))  # done; a new run goes to a new --out
    template, system_turn = _rendering(config)
    raw, inputs = raw_prompts(config.prompts, config.split)
    prompts, dropped = distinct_prompts(raw, seen_prompt_ids(config.exclude_prompts), config.max_prompts)
    if not prompts:
        raise UserError(f"{config.prompts}: no prompts left to answer ({dict(dropped) or 'the input is empty'})")
    dist = Dist.start(config.device, timedelta(hours=12))  # the last barrier waits for the slowest process
    device = dist.device
    dtype = select_dtype(config.dtype, device)
    policy_dir = model_dir(config.policy)
    model, tokenizer = load_causal_lm(policy_dir, config.policy, dtype, device)
    if len(tokenizer) > (vocabulary := model.get_input_embeddings().num_embeddings):  # its ids would index past the embedding
        raise UserError(f"model {config.policy}: its tokenizer has {len(tokenizer)} tokens but the model's vocabulary "
                        f"{vocabulary}; the tokenizer belongs to another model")
    model.eval()
    renderer = make_renderer(tokenizer, template, config.chat_template_kwargs, system_turn)
    prompts, ids = _rendered(prompts, renderer, dropped)
    prompts, ids = _fitting(prompts, ids, model, config.max_new_tokens, dropped)
    stop_ids = stop_token_ids(renderer, model.generation_config.eos_token_id)
    order = sorted(range(len(prompts)), key=lambda i: (len(ids[i]), i))
    chunks = out / CHUNKS_DIR
    chunks.mkdir(parents=True, exist_ok=True)
    starts = range(0, len(order), config.chunk_prompts)
    began, generated_tokens = time.perf_counter(), 0
    # Under torchrun process r answers chunks r, r + W, …; a chunk's seed is its number's, so the
    # answers do not depend on how many processes there are.
    mine = [number for number in range(len(starts)) if number % dist.world == dist.rank]
    with progress("generate", total=sum(len(order[starts[n]:starts[n] + config.chunk_prompts]) for n in mine)) as bar, \
            torch.inference_mode():
        for number in mine:
            start = starts[number]
            path = chunks / f"chunk-{number:05d}.jsonl"
            part = order[start:start + config.chunk_prompts]
            if not path.is_file():  # a finished chunk of a killed run is kept
                torch.manual_seed(chunk_seed(config.seed, number))
                lines, tokens = _chunk_lines(model, tokenizer, [prompts[i] for i in part], [ids[i] for i in part], config,
                                             stop_ids)
                write_text_atomic(path, "".join(lines))
                generated_tokens += tokens
            bar.advance(len(part))
    dist.barrier()  # every chunk written
    # The run's rate: every process's new tokens over the time until the slowest was done.
    seconds, generated_tokens = time.perf_counter() - began, sum(dist.gather_objects(generated_tokens))
    if dist.is_main:
        _finish(config, out, starts, inputs, len(raw), len(prompts), dropped,
                model_fingerprint(policy_dir, config.policy, dtype, device), generated_tokens, seconds)
    dist.barrier()
    return Manifest.read(out, stages=("generate",))


def _rendering(config: GenerateConfig) -> tuple[str, str]:
    """(template, system turn) the prompts are rendered with. Prompts taken from shards are
    rendered as the shards were (tokenize's template, system-turn rule and template options), so
    generate samples from the prompts the shards hold; other prompts as the command says."""
    path = Path(config.prompts)
    if path.is_dir():
        manifest = Manifest.read(path)
        if manifest.stage in ("tokenize", "precompute-ref"):
            tokenized = shard_tokenize_config(manifest)
            check_template_kwargs(config.chat_template_kwargs, tokenized.get("chat_template_kwargs", {}),
                                  f"{config.prompts}: the shards")
            template = tokenized.get("template", "auto")
            if config.template not in ("auto", template):
                raise UserError(f"--template {config.template}: {config.prompts} was tokenized with --template {template}; "
                                "drop --template")
            return template, tokenized.get("system_turn", "fold")
    return config.template, "fold"


def _rendered(prompts: list[list[dict]], renderer: Any, dropped: Counter) -> tuple[list[list[dict]], list[list[int]]]:
    """The prompts the chat template renders, with their ids; the ones it refuses counted by reason
    (template_error, or system_not_supported), as tokenize counts them."""
    ids, reasons = prompt_token_ids(renderer, prompts)
    dropped.update(reason for reason in reasons if reason)
    keep = [i for i, reason in enumerate(reasons) if reason is None]
    if not keep:
        refused = Counter(reason for reason in reasons if reason)
        hint = ("their text holds the tokenizer's special tokens: take those strings out of the prompts"
                if set(refused) == {SPECIAL_TOKEN_IN_TEXT} else "check --chat-template-kwargs or use --template plain")
        raise UserError(f"every prompt was refused in rendering ({dict(refused)}); {hint}")
    return [prompts[i] for i in keep], [ids[i] for i in keep]


def _fitting(prompts: list[list[dict]], ids: list[list[int]], model: Any, max_new_tokens: int,
             dropped: Counter) -> tuple[list[list[dict]], list[list[int]]]:
    """The prompts whose answer still fits the model's positions; the rest counted as `prompt_too_long`."""
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    keep = [i for i in range(len(ids)) if limit is None or len(ids[i]) + max_new_tokens <= limit]
    if len(keep) < len(ids):
        dropped[PROMPT_TOO_LONG] += len(ids) - len(keep)
    if not keep:
        raise UserError(f"every prompt is longer than the model's {limit} positions allow with --max-new-tokens {max_new_tokens}")
    return [prompts[i] for i in keep], [ids[i] for i in keep]


def _finish(config: GenerateConfig, out: Path, starts: range, inputs: list[InputFile], read: int, kept: int,
            dropped: Counter, policy_fingerprint: Any, generated_tokens: int, seconds: float) -> Manifest:
    """Join the chunks into generations.jsonl (atomically), then the manifest, then drop the chunks."""
    chunk_files = [out / CHUNKS_DIR / f"chunk-{n:05d}.jsonl" for n in range(len(starts))]
    text = "".join(p.read_text(encoding="utf-8") for p in chunk_files)
    finish_reasons = Counter(r["finish_reason"] for line in text.splitlines() for r in json.loads(line)["responses"])
    write_text_atomic(out / GENERATIONS_FILE, text)
    manifest = Manifest(stage="generate", package_version=package_version(), config=config.model_dump(), inputs=inputs,
                        counts=Counts(read=read, kept=kept, dropped=dict(dropped)), outputs=[GENERATIONS_FILE],
                        stats={"responses": sum(finish_reasons.values()), "finish_reasons": dict(finish_reasons),
                               "policy": policy_fingerprint.model_dump(),
                               # this run's new tokens (a resumed run's: of the chunks it wrote), all processes'
                               "generated_tokens": generated_tokens,
                               "tokens_per_s": generated_tokens / seconds if generated_tokens else None},
                        versions={"torch": torch.__version__, "transformers": _transformers_version()})
    manifest.write(out)
    shutil.rmtree(out / CHUNKS_DIR)
    return manifest


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def summary_lines(manifest: Manifest) -> list[str]:
    stats, counts = manifest.stats, manifest.counts
    dropped = ", ".join(f"{k} {v}" for k, v in counts.dropped.items()) or "none"
    speed = f", {stats['tokens_per_s']:,.0f} tokens/s" if stats.get("tokens_per_s") else ""
    return [f"generate: {counts.kept} prompts × {manifest.config['n']} = {stats['responses']} responses "
            f"(finish reasons {stats['finish_reasons']}); prompts left out: {dropped}{speed}",
            f"wrote {Path(manifest.config['out']) / GENERATIONS_FILE}"]

