"""`prefdata judge`: a score for every sampled answer, by a reward model or a Python function.

    DIR/generations.jsonl ──judge──▶ OUT/judged.jsonl     the same rows, each response with "score"
                                     OUT/quarantine.jsonl every response left out, with its reason
                                     OUT/manifest.json    read = scored + dropped by reason (responses)

`prefdata ingest OUT/judged.jsonl` then pairs the answers of each prompt by score (`--pairs`,
`--min-margin`; prefdata.formats.judged).

- `--reward-model PATH`: an `AutoModelForSequenceClassification` with one output, reading the
  conversation rendered by its own tokenizer's chat template (the plain template if it has none),
  truncated from the left so the answer is always seen; batched by length, GPU when present.
- `--reward module:function`: called as `f(prompt_messages, response_text) -> float`, or `f(text)`
  for a one-argument function (what `prefdata eval` has always taken).

An empty answer is not scored (`empty_response`); a function that raises or returns something
that is not a finite number leaves that answer out as `judge_error`, with the message.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.errors import UserError
from schemas.io import read_utf8, sha256_file, write_text_atomic
from schemas.location import check_apart, local_only
from schemas.manifest import QUARANTINE_FILE, Counts, InputFile, Manifest, package_version
from schemas.progress import progress
from schemas.render import make_renderer
from train.device import select_device, select_dtype
from train.generate import GENERATIONS_FILE
from train.models import model_dir, model_fingerprint
from train.rewards import SCORED_AT

JUDGED_FILE = "judged.jsonl"
EMPTY_RESPONSE = "empty_response"
JUDGE_ERROR = "judge_error"


class JudgeOptions(BaseModel):
    """Which judge, and how it runs: what generate → judge, eval and iterate share."""

    model_config = ConfigDict(extra="forbid")

    reward_model: str | None = Field(None, description="A sequence-classification reward model (directory or Hub name).")
    reward: str | None = Field(None, description="A reward function, module:function: f(prompt_messages, text) or f(text).")
    batch_size: int = Field(16, gt=0, description="Answers per reward-model forward pass.")
    max_length: int = Field(2048, gt=1, description="Reward model: conversations are cut to this many tokens, from the left.")
    device: str = Field("auto", description="auto, cuda, mps or cpu.")
    dtype: str = Field("auto", description="auto (bfloat16 on a GPU that has it, else float32), float32, bfloat16, float16.")

    @model_validator(mode="after")
    def _one_judge(self) -> JudgeOptions:
        if (self.reward_model is None) == (self.reward is None):
            raise UserError("judge: give exactly one of --reward-model PATH and --reward module:function")
        return self

    @property
    def name(self) -> str:
        return self.reward or self.reward_model or ""


class JudgeConfig(JudgeOptions):
    generations: str = Field(description="Output directory of prefdata generate (or a generations.jsonl).")
    out: str = Field(description="Directory for judged.jsonl, quarantine.jsonl and manifest.json.")


class JudgeError(NamedTuple):
    message: str


Score = float | JudgeError
Judge = Callable[[list[list[dict]], list[str]], list[Score]]


# ---------------------------------------------------------------------------------------------
# Judges


def load_reward(path: str) -> Callable[[list[dict], str], float]:
    """`module:function` as a two-argument reward (prompt messages, answer text); a one-argument
    function is given the answer text alone."""
    module_name, _, function_name = path.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError, ValueError):
        raise UserError(f"--reward {path}: cannot import it; give module:function") from None
    try:
        positional = [p for p in inspect.signature(function).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    except (TypeError, ValueError):  # a builtin without a signature: take it as f(text)
        positional = [None]
    return function if len(positional) >= 2 else lambda _prompt, text: function(text)


def function_judge(reward: Callable[[list[dict], str], float]) -> Judge:
    def judge(prompts: list[list[dict]], texts: list[str]) -> list[Score]:
        return [_call(reward, prompt, text) for prompt, text in zip(prompts, texts)]

    return judge


def _call(reward: Callable[[list[dict], str], float], prompt: list[dict], text: str) -> Score:
    try:
        value = reward(prompt, text)
    except Exception as exc:  # the user's function: any failure is that answer's, not the run's
        return JudgeError(f"{type(exc).__name__}: {exc}")
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or not math.isfinite(value):
        return JudgeError(f"returned {value!r}, not a finite number")
    return float(value)


def build_judge(options: JudgeOptions) -> tuple[Judge, dict[str, Any]]:
    """The judge the options name, and what identifies it in a manifest."""
    if options.reward is not None:
        return function_judge(load_reward(options.reward)), {"reward": options.reward}
    return reward_model_judge(options)


def score_responses(judge: Judge, prompts: list[list[dict]], responses: list[list[dict]], batch_size: int,
                    bar: Any = None) -> list[list[Score]]:
    """A score (or why there is none) for every response of every prompt; empty ones are not judged."""
    slots = [(p, k) for p, answers in enumerate(responses) for k, r in enumerate(answers) if str(r.get("text", "")).strip()]
    scores: list[list[Score]] = [[JudgeError(EMPTY_RESPONSE)] * len(answers) for answers in responses]
    for start in range(0, len(slots), batch_size):
        part = slots[start:start + batch_size]
        for (p, k), score in zip(part, judge([prompts[p] for p, _ in part], [responses[p][k]["text"] for p, k in part])):
            scores[p][k] = score
        if bar is not None:
            bar.advance(len(part))
    return scores


def reward_model_judge(config: JudgeOptions) -> tuple[Judge, dict[str, Any]]:
    """A batched sequence-classification judge, and its fingerprint for the manifest."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    device = select_device(config.device)
    dtype = select_dtype(config.dtype, device)
    directory = model_dir(config.reward_model)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(directory, dtype=dtype).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except Exception as exc:  # any load failure is a one-line error
        raise UserError(f"--reward-model {config.reward_model}: cannot load it as a sequence classifier ({exc})") from None
    if model.config.num_labels != 1:
        raise UserError(f"--reward-model {config.reward_model}: has {model.config.num_labels} outputs; a reward model has one")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id  # where each row's last real token is
    tokenizer.truncation_side = "left"  # keep the answer, lose the oldest turns
    renderer = make_renderer(tokenizer, "auto")
    if getattr(model.config, "reward_scored_at", None) == SCORED_AT:
        judge = _shard_layout_judge(model, renderer, config, device)
        return judge, {"reward_model": model_fingerprint(directory, config.reward_model, dtype, device).model_dump(),
                       "scored_at": SCORED_AT}

    def judge(prompts: list[list[dict]], texts: list[str]) -> list[Score]:
        rendered = renderer.conversations(prompts, texts)
        # A conversation the reward model's template refuses is that answer's error, not the batch's.
        scores: list[Score] = [JudgeError(f"chat template: {reason}") if reason else 0.0 for reason in rendered.reasons]
        conversations = [text or "" for text in rendered.texts]
        order = [i for i in np.argsort([len(c) for c in conversations], kind="stable") if rendered.reasons[i] is None]
        for start in range(0, len(order), config.batch_size):
            rows = order[start:start + config.batch_size]
            batch = tokenizer([conversations[i] for i in rows], add_special_tokens=renderer.kind == "plain",
                              truncation=True, max_length=config.max_length, padding=True, return_tensors="pt").to(device)
            with torch.inference_mode():
                values = model(**batch).logits[:, 0].float().cpu().tolist()
            for i, value in zip(rows, values):
                scores[i] = value if math.isfinite(value) else JudgeError(f"reward model gave {value}")
        return scores

    fingerprint = model_fingerprint(directory, config.reward_model, dtype, device)
    return judge, {"reward_model": fingerprint.model_dump()}


def _shard_layout_judge(model: Any, renderer: Any, config: JudgeOptions, device: torch.device) -> Judge:
    """A reward model `prefdata train --objective reward` made: each answer's ids as tokenize
    stores a pair's row (`conversation_token_ids`), the reward read at its last token, as in
    training (`RewardScorer`); longer rows lose their oldest tokens."""
    from schemas.render import conversation_token_ids
    from train.models import padding_id
    from train.rewards import RewardScorer

    scorer, pad = RewardScorer(model), padding_id(renderer.tokenizer)

    def judge(prompts: list[list[dict]], texts: list[str]) -> list[Score]:
        ids, reasons = conversation_token_ids(renderer, prompts, texts)
        scores: list[Score] = [JudgeError(f"chat template: {reason}") if reason else 0.0 for reason in reasons]
        order = [i for i in np.argsort([len(row or []) for row in ids], kind="stable") if reasons[i] is None]
        for start in range(0, len(order), config.batch_size):
            rows = order[start:start + config.batch_size]
            kept = [ids[i][-config.max_length:] for i in rows]
            width = max(len(row) for row in kept)
            batch = torch.full((len(kept), width), pad, dtype=torch.long)
            real = torch.zeros((len(kept), width), dtype=torch.bool)
            for j, row in enumerate(kept):
                batch[j, :len(row)] = torch.tensor(row)
                real[j, :len(row)] = True
            with torch.inference_mode():
                values = scorer(batch.to(device), real.to(device)).cpu().tolist()
            for i, value in zip(rows, values):
                scores[i] = value if math.isfinite(value) else JudgeError(f"reward model gave {value}")
        return scores

    return judge


# ---------------------------------------------------------------------------------------------
# The stage


def _generations_file(path_text: str) -> Path:
    path = Path(path_text)
    path = path / GENERATIONS_FILE if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"{path_text}: no {GENERATIONS_FILE}; run prefdata generate first")
    return path


def _read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(read_utf8(path, "re-run prefdata generate").splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not (isinstance(row, dict) and isinstance(row.get("prompt"), list) and isinstance(row.get("responses"), list)
                and all(isinstance(response, dict) and isinstance(response.get("text"), str) for response in row["responses"])):
            raise UserError(f"{path}:{number}: not a prefdata generate row; re-run prefdata generate")
        rows.append(row)
    return rows


def judge(config: JudgeConfig) -> Manifest:
    local_only("judge", {"GENERATIONS": config.generations, "--out": config.out})
    check_apart(config.out, [config.generations, config.reward_model])
    source = _generations_file(config.generations)
    rows = _read_rows(source)
    if not rows:  # an empty judged file would only fail later, in ingest
        raise UserError(f"{source}: no generations to judge; run prefdata generate on prompts first")
    score_fn, judge_info = build_judge(config)
    with progress("judge", total=sum(len(row["responses"]) for row in rows)) as bar:
        scores = score_responses(score_fn, [row["prompt"] for row in rows], [row["responses"] for row in rows],
                                 config.batch_size, bar)
    judged, quarantined, dropped = [], [], Counter()
    for row, row_scores in zip(rows, scores):
        kept = []
        for k, (response, score) in enumerate(zip(row["responses"], row_scores)):
            if isinstance(score, JudgeError):
                reason = EMPTY_RESPONSE if score.message == EMPTY_RESPONSE else JUDGE_ERROR
                dropped[reason] += 1
                quarantined.append({"prompt_id": row.get("prompt_id"), "response": k, "reason": reason,
                                    "message": score.message, "text": response.get("text")})
            else:
                kept.append({**response, "score": score})
        judged.append({**row, "responses": kept, "judge": config.name})
    return _write(config, source, judged, quarantined, sum(map(len, scores)), dropped, judge_info)


def _write(config: JudgeConfig, source: Path, judged: list[dict], quarantined: list[dict], read: int, dropped: Counter,
           judge_info: dict[str, Any]) -> Manifest:
    out = Path(config.out)
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in judged)
    write_text_atomic(out / JUDGED_FILE, lines)
    write_text_atomic(out / QUARANTINE_FILE, "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in quarantined))
    scores = [r["score"] for row in judged for r in row["responses"]]
    manifest = Manifest(stage="judge", package_version=package_version(), config=config.model_dump(),
                        inputs=[InputFile(path=str(source), sha256=sha256_file(source), rows=len(judged))],
                        counts=Counts(read=read, kept=len(scores), dropped=dict(dropped)),
                        outputs=[JUDGED_FILE, QUARANTINE_FILE],
                        stats={**judge_info, "mean_score": float(np.mean(scores)) if scores else None,
                               "prompts": len(judged)})
    manifest.write(out)
    return manifest


def summary_lines(manifest: Manifest) -> list[str]:
    counts = manifest.counts
    dropped = ", ".join(f"{k} {v}" for k, v in counts.dropped.items()) or "none"
    mean = manifest.stats.get("mean_score")
    return [f"judge: {counts.kept} of {counts.read} responses scored (mean {mean if mean is None else f'{mean:.4g}'}); "
            f"left out: {dropped}",
            f"wrote {Path(manifest.config['out']) / JUDGED_FILE}; next: prefdata ingest {Path(manifest.config['out']) / JUDGED_FILE}"]
