"""`prefdata eval` / `python -m train.eval`: how far a policy moved from its reference, and whether
that bought reward.

- Preference metrics on the eval shards: implicit reward β·(log π − log π_ref) of chosen and
  rejected (π_ref = the stored `ref_*_logps`), its accuracy and mean margin.
- Generation: completions sampled for the eval prompts from the policy and from the reference, and
  the sequence-level KL(π‖π_ref) estimated as the mean over policy samples of log π(y|x) − log
  π_ref(y|x). Samples are scored with THE log-prob function (`train.logprobs.sequence_logps` over
  `collate_pairs` batches), so the KL uses exactly the log-probs that training and precompute-ref use.
- With a judge (`--reward module:function` or `--reward-model PATH`, as `prefdata judge` takes):
  the mean judged reward of the policy's and the reference's samples; with `--baseline MODEL`, the
  policy's win rate against the baseline's samples on the same prompts (sample j of one against
  sample j of the other; a tie counts half), with a 95% interval over prompts (a normal interval
  on the per-prompt mean outcome: samples of one prompt are not independent); with `--best-of N`,
  the mean over prompts of the best judged reward among N reference samples (Best-of-N, the
  baseline any trained policy should beat at its KL).
"""

from __future__ import annotations

import json
import math
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.errors import UserError
from schemas.io import write_text_atomic
from schemas.location import local_only
from schemas.manifest import ModelFingerprint
from schemas.render import (
    CHAT_TEMPLATE_KWARGS_HELP,
    ChatTemplateKwargs,
    check_template_kwargs,
    make_renderer,
    prompt_token_ids,
    stop_token_ids,
)
from train.batching import TokenColumns, collate_pairs, token_budget_batches
from train.data import SplitData, open_shards
from train.device import DTYPES, empty_device_cache, select_device, select_dtype
from train.distributed import Dist
from train.generate import GenerateConfig, Sampling, generation_batches, record_files, sample_completions, shard_tokenize_config
from train.judge import Judge, JudgeError, JudgeOptions, build_judge, score_responses
from train.logprobs import sequence_logps
from train.models import check_fits, check_tokenizer, load_causal_lm, model_dir, model_fingerprint, padding_id, same_weights
from train.rewards import is_reward_model
from train.tracking import open_tracker


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shards: str = Field(description="Output of prefdata precompute-ref; its eval split is used.")
    policy: str = Field(description="The trained model directory (e.g. OUT/final).")
    reference: str | None = Field(None, description="The reference model the shards were scored with (not for a reward model).")
    out: str = Field(description="Directory for eval.json and reward_vs_kl.png.")
    reward: str | None = Field(None, description="Judge: a reward function, module:function (f(prompt_messages, text) or f(text)).")
    reward_model: str | None = Field(None, description="Judge: a sequence-classification reward model.")
    baseline: str | None = Field(None, description="A model to compare the policy with: judged win rate on the eval prompts.")
    best_of: int | None = Field(None, gt=1, description="Best-of-N: the mean best judged reward among N reference samples.")
    beta: float = Field(0.1, gt=0, description="β of the implicit reward margin (accuracy does not depend on it).")
    samples: int = Field(4, gt=0, description="Completions sampled per prompt, from each model.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    max_new_tokens: int = Field(32, gt=0, description="Longest completion sampled.")
    max_prompts: int | None = Field(None, gt=0, description="Use the first N distinct eval prompts.")
    batch_tokens: int = Field(16_384, gt=0, description="Padded tokens per scoring forward pass.")
    seed: int = Field(0, description="Sampling seed (under torchrun, process r samples with seed + r).")
    device: Literal["auto", "cuda", "mps", "cpu"] = Field(
        "auto", description="auto: CUDA if present, else MPS, else CPU; under torchrun each process takes its LOCAL_RANK's GPU "
        "and a share of the batches and prompts.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Every model's dtype. auto: the one the shards' reference log-probs were computed in, so accuracy "
        "compares like with like (a reward model: bfloat16 on a GPU that has it, else float32).")
    chat_template_kwargs: ChatTemplateKwargs = Field({}, description=CHAT_TEMPLATE_KWARGS_HELP)
    report_to: Literal["none", "tensorboard", "wandb"] = Field(
        "none", description="Also send eval.json's numbers to TensorBoard (OUT/tensorboard) or W&B (OUT/wandb, offline "
        "unless WANDB_MODE is set).")

    @model_validator(mode="after")
    def _judge_for_judged_metrics(self) -> EvalConfig:
        if self.reference is None and not is_reward_model(self.policy):
            raise UserError("eval: --reference is needed for a policy (the model the shards' reference log-probs came from)")
        if self.reward is not None and self.reward_model is not None:
            raise UserError("eval: give one judge, --reward or --reward-model, not both")
        if (self.baseline or self.best_of) and self.reward is None and self.reward_model is None:
            raise UserError("eval: --baseline and --best-of are judged; give --reward module:function or --reward-model PATH")
        return self

    def judge_options(self) -> JudgeOptions | None:
        if self.reward is None and self.reward_model is None:
            return None
        return JudgeOptions(reward=self.reward, reward_model=self.reward_model, device="cpu")


# A pair is won when its log-ratio margin Δchosen − Δrejected exceeds this, as the trainer's
# rewards/accuracies counts a margin above 0: below it the policy and the stored reference differ
# by float32 rounding (other batching, prefix sharing), which is a tie.
TIE_TOLERANCE = 1e-3


def rounding_band(dtypes: tuple[torch.dtype, ...], tokens: np.ndarray) -> np.ndarray:
    """Nats an answer's log-ratio log πθ − log πref may be from 0 by rounding alone, in the coarser
    of `dtypes` (the trainer's step-0 check tolerance, which grows with the answer's length). A
    worst case, not a typical error: eval reports the share of margins inside it beside the
    accuracy instead of moving the accuracy's line."""
    from train.reference import reference_check_tolerance

    return np.max([reference_check_tolerance(dtype, tokens) for dtype in dtypes], axis=0)


def _model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def preference_metrics(model: Any, data: SplitData, beta: float, pad_id: int, batch_tokens: int,
                       dist: Dist, stored_dtype: torch.dtype) -> dict[str, float]:
    """Implicit-reward accuracy and mean margin over the whole split, against the stored reference;
    each process scores every world-th batch and the sums are added up. Pairs: the chosen answer's
    reward β·(log πθ − log πref) above the rejected one's. Unpaired rows: the reward's sign is the
    label's (> 0 desirable, < 0 undesirable), and the margin is the mean reward of desirable rows
    minus that of undesirable ones. `within_rounding`: the share whose margin (an unpaired row's
    log-ratio) is within `rounding_band` of 0 for the model's dtype and `stored_dtype`, the one the
    stored reference log-probs were computed in: in bf16 an accuracy carried by such margins is noise."""
    device = _model_device(model)
    dtypes = (next(model.parameters()).dtype, stored_dtype)
    unpaired = data.labels is not None
    # right answers; the log-ratio sum and count of chosen answers (desirable rows), and of rejected
    # (undesirable); margins within rounding
    totals = torch.zeros(6, dtype=torch.float64)
    # An unpaired row's KL completion plays no part here: only its completion is scored.
    columns = data.columns.first_only if unpaired else data.columns
    for rows in token_budget_batches(columns.pair_lengths, batch_tokens)[dist.rank::dist.world]:
        logps = sequence_logps(model, collate_pairs(columns, rows, pad_id).to(device))
        ref_first, ref_second = (torch.from_numpy(x).to(device) for x in data.ref_logps(rows))
        first = (logps.chosen - ref_first).double()
        band = torch.from_numpy(rounding_band(dtypes, columns.chosen.lengths[rows])).to(device)
        if unpaired:
            desirable = torch.from_numpy(data.labels[rows]).to(device)
            right = torch.where(desirable, first > TIE_TOLERANCE, first < -TIE_TOLERANCE)
            parts = [right.sum(), (first * desirable).sum(), desirable.sum(), (first * ~desirable).sum(), (~desirable).sum(),
                     (first.abs() <= band).sum()]
        else:
            second = (logps.rejected - ref_second).double()
            band += torch.from_numpy(rounding_band(dtypes, columns.rejected.lengths[rows])).to(device)
            parts = [(first - second > TIE_TOLERANCE).sum(), first.sum(), len(rows), second.sum(), len(rows),
                     ((first - second).abs() <= band).sum()]
        totals += torch.tensor([float(x) for x in parts], dtype=torch.float64)
    right, first_sum, first_n, second_sum, second_n, within = dist.sum(totals).tolist()
    margin = beta * (first_sum / max(first_n, 1) - second_sum / max(second_n, 1))
    return {"accuracy": right / len(data), "margin": margin, "within_rounding": within / len(data),
            ("rows" if unpaired else "pairs"): len(data),
            **({"desirable": int(first_n), "undesirable": int(second_n)} if unpaired else {})}


def eval_prompts(data: SplitData, max_prompts: int | None) -> tuple[list[np.ndarray], list[int]]:
    """The distinct prompts of the split (several pairs can share one), in first-seen order, and
    the first row of each."""
    seen: dict[bytes, int] = {}
    for i in range(len(data)):
        seen.setdefault(data.columns.prompt.row(i).tobytes(), i)
    rows = list(seen.values())[:max_prompts]
    return [data.columns.prompt.row(i) for i in rows], rows


def sample(model: Any, prompts: list[np.ndarray], config: EvalConfig, tokenizer: Any, stop_ids: list[int],
           n: int | None = None) -> list[np.ndarray]:
    """`n` (default `config.samples`) completions per prompt (prompt-major), each cut after its
    first stop token (kept; `stop_token_ids`, the ones generate stops at).
    A completion without EOS within max_new_tokens stays cut there: its log-prob
    is then that of the truncated sequence, which is exactly what was sampled."""
    return sample_completions(model, prompts, n or config.samples, config.temperature, 1.0, config.max_new_tokens,
                              stop_ids, padding_id(tokenizer))


def sample_shared(model: Any, prompts: list[np.ndarray], config: EvalConfig, tokenizer: Any, stop_ids: list[int],
                  dist: Dist, n: int | None = None) -> list[np.ndarray]:
    """`sample` with the prompts shared out: each process samples every world-th prompt, and every
    process gets all the completions back, prompt-major in prompt order."""
    per_prompt = n or config.samples
    mine = prompts[dist.rank::dist.world]
    gathered = dist.gather_objects(sample(model, mine, config, tokenizer, stop_ids, n) if mine else [])
    by_prompt: list[list[np.ndarray]] = [[] for _ in prompts]
    for rank, completions in enumerate(gathered):
        for j, prompt in enumerate(range(rank, len(prompts), dist.world)):
            by_prompt[prompt] = completions[j * per_prompt:(j + 1) * per_prompt]
    return [c for group in by_prompt for c in group]


def completion_logps(model: Any, prompts: list[np.ndarray], completions: list[np.ndarray], pad_id: int,
                     batch_tokens: int) -> np.ndarray:
    """log π(y|x) of each completion (prompt i // samples), float32 [N], through `sequence_logps`.
    Each completion fills both answer slots of a pair; only the chosen slot's value is kept."""
    per_prompt = len(completions) // len(prompts)
    prompt_ids = [prompts[i // per_prompt] for i in range(len(completions))]
    answers = pa.array([c.astype(np.int32) for c in completions], type=pa.list_(pa.int32()))
    table = pa.table({"prompt_input_ids": pa.array([p.astype(np.int32) for p in prompt_ids], type=pa.list_(pa.int32())),
                      "chosen_input_ids": answers, "rejected_input_ids": answers})
    columns = TokenColumns.from_table(table)
    result = np.zeros(len(completions), dtype=np.float32)
    device = _model_device(model)
    for rows in token_budget_batches(columns.pair_lengths, batch_tokens):
        result[rows] = sequence_logps(model, collate_pairs(columns, rows, pad_id).to(device)).chosen.float().cpu().numpy()
    return result


def sequence_kl(policy: Any, reference: Any, prompts: list[np.ndarray], policy_samples: list[np.ndarray],
                pad_id: int, batch_tokens: int, dist: Dist | None = None) -> float:
    """KL(π‖π_ref) ≈ mean over y ~ π of log π(y|x) − log π_ref(y|x) (an unbiased estimate); under
    torchrun (`dist`) each process scores the samples of every world-th prompt."""
    dist = dist or Dist(0, 1, _model_device(policy))
    per_prompt = len(policy_samples) // len(prompts)
    mine = range(dist.rank, len(prompts), dist.world)
    samples = [policy_samples[p * per_prompt + j] for p in mine for j in range(per_prompt)]
    total = torch.zeros(2, dtype=torch.float64)  # Σ log-ratio, samples
    if samples:
        share = [prompts[p] for p in mine]
        ratios = (completion_logps(policy, share, samples, pad_id, batch_tokens)
                  - completion_logps(reference, share, samples, pad_id, batch_tokens))
        total += torch.tensor([float(ratios.astype(np.float64).sum()), len(samples)], dtype=torch.float64)
    ratio_sum, count = dist.sum(total).tolist()
    return ratio_sum / count


def prompt_messages(shards: str, record_ids: list[str]) -> list[list[dict]]:
    """The prompt messages of these records, from the record files the shards were tokenized from:
    a judge reads the conversation, not token ids."""
    wanted, found = set(record_ids), {}
    for path in record_files(Path(shards), "all"):
        table = pq.read_table(path, columns=["id", "prompt"])
        for record_id, prompt in zip(table.column("id").to_pylist(), table.column("prompt").to_pylist()):
            if record_id in wanted:
                found[record_id] = prompt
    missing = wanted - found.keys()
    if missing:
        raise UserError(f"{shards}: {len(missing)} eval records are not in the record files the shards were made from; "
                        "re-run tokenize and precompute-ref from the current curated set")
    return [found[i] for i in record_ids]


def judged_scores(judge: Judge, messages: list[list[dict]], tokenizer: Any, completions: list[np.ndarray],
                  batch_size: int) -> np.ndarray:
    """The judge's score of each completion (prompt-major) as [prompts, samples], NaN where it gave
    none (an empty answer is not judged: `score_responses`, as prefdata judge does)."""
    per_prompt = len(completions) // len(messages)
    texts = [t.strip() for t in tokenizer.batch_decode(completions, skip_special_tokens=True)]
    responses = [[{"text": t} for t in texts[p * per_prompt:(p + 1) * per_prompt]] for p in range(len(messages))]
    scores = score_responses(judge, messages, responses, batch_size)
    return np.array([[math.nan if isinstance(s, JudgeError) else s for s in row] for row in scores], dtype=np.float64)


def win_rate(policy_scores: np.ndarray, baseline_scores: np.ndarray) -> dict[str, Any]:
    """Policy vs baseline, sample j against sample j of each prompt ([prompts, samples] arrays): a
    win 1, a tie ½, a loss 0; pairs where either score is missing are left out and counted. The
    95% interval is normal over the per-prompt mean outcomes (the prompts are the independent
    draws), clipped to [0, 1]."""
    valid = ~(np.isnan(policy_scores) | np.isnan(baseline_scores))
    outcome = np.where(policy_scores > baseline_scores, 1.0, np.where(policy_scores == baseline_scores, 0.5, 0.0))
    per_prompt = np.array([outcome[p][valid[p]].mean() for p in range(len(outcome)) if valid[p].any()])
    rate = float(per_prompt.mean()) if len(per_prompt) else math.nan
    half_width = 1.96 * float(per_prompt.std(ddof=1)) / math.sqrt(len(per_prompt)) if len(per_prompt) > 1 else math.inf
    return {"rate": rate, "low": max(0.0, rate - half_width), "high": min(1.0, rate + half_width),
            "wins": int((outcome[valid] == 1).sum()), "ties": int((outcome[valid] == 0.5).sum()),
            "losses": int((outcome[valid] == 0).sum()), "unjudged": int((~valid).sum()), "prompts": len(per_prompt)}


def plot_reward_vs_kl(points: list[dict[str, Any]], path: Path) -> None:
    """One marker per run: x = KL(π‖π_ref), y = mean reward; each point's `label` names it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for point in points:
        ax.scatter(point["kl"], point["reward"], s=40)
        ax.annotate(point["label"], (point["kl"], point["reward"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("sequence KL(π ‖ π_ref), nats")
    ax.set_ylabel("mean lexicon reward of samples")
    ax.set_title("reward vs KL on eval prompts")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# Calibration buckets: pairs sorted by |margin|, cut into this many equal groups.
CALIBRATION_BUCKETS = 5


def calibration(margins: np.ndarray) -> list[dict[str, float]]:
    """Accuracy by |margin| bucket beside what a calibrated Bradley–Terry model expects there,
    the mean of σ(|margin|) (the probability it gives its own preferred answer)."""
    order = np.argsort(np.abs(margins), kind="stable")
    buckets = []
    for part in np.array_split(order, min(CALIBRATION_BUCKETS, len(margins))):
        size = np.abs(margins[part])
        buckets.append({"low": float(size.min()), "high": float(size.max()), "pairs": len(part),
                        "accuracy": float((margins[part] > 0).mean()), "expected": float((1 / (1 + np.exp(-size))).mean())})
    return buckets


def reward_model_metrics(model: Any, data: SplitData, pad_id: int, batch_tokens: int, dist: Dist) -> dict[str, Any]:
    """Pairwise accuracy (chosen scored above rejected), mean margin and calibration over the whole
    split; each process scores every world-th batch."""
    from train.rewards import RewardScorer, pair_rewards

    scorer, device = RewardScorer(model), _model_device(model)
    margins = np.zeros(len(data), dtype=np.float64)
    for rows in token_budget_batches(data.columns.pair_lengths, batch_tokens)[dist.rank::dist.world]:
        chosen, rejected = pair_rewards(scorer, collate_pairs(data.columns, rows, pad_id).to(device))
        margins[rows] = (chosen - rejected).double().cpu().numpy()
    margins = dist.sum(torch.from_numpy(margins)).numpy()  # each row scored by one process, 0 on the others
    buckets = calibration(margins)
    return {"kind": "reward_model", "accuracy": float((margins > 0).mean()), "margin": float(margins.mean()),
            "pairs": len(data), "calibration": buckets,
            "calibration_gap": float(np.average([abs(b["accuracy"] - b["expected"]) for b in buckets],
                                                weights=[b["pairs"] for b in buckets]))}


def eval_json(result: dict[str, Any]) -> str:
    """eval.json's text: a figure with nothing to average (every answer unjudged, no prompt both
    sides answered) is null, as JSON has no NaN (json.dumps would write one that strict readers refuse)."""
    def finite(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: finite(v) for key, v in value.items()}
        if isinstance(value, list):
            return [finite(v) for v in value]
        return None if isinstance(value, float) and not math.isfinite(value) else value

    return json.dumps(finite(result), indent=2, allow_nan=False)


def models_dtype(name: str, reference: ModelFingerprint | None, device: torch.device) -> torch.dtype:
    """`auto`: the dtype the stored reference log-probs were computed in (the policy's log-probs are
    set against them), else bfloat16 on a GPU that has it; or the named dtype."""
    return select_dtype(reference.dtype if name == "auto" and reference is not None else name, device)


def evaluate_reward_model(config: EvalConfig, dist: Dist) -> dict[str, Any]:
    from train.rewards import load_reward_model

    manifest, _, data = open_shards(config.shards, need_ref=False)
    if data is None or not len(data):
        raise UserError(f"{config.shards}: no eval split (eval-*.arrow); curate with --eval-fraction > 0")
    if data.labels is not None:
        raise UserError(f"{config.shards}: unpaired shards; a reward model is evaluated on pairs (its pairwise accuracy): "
                        "pass shards tokenized from a paired record set")
    check_tokenizer(model_dir(config.policy), config.policy, manifest.tokenizer)
    model, tokenizer = load_reward_model(model_dir(config.policy), config.policy, models_dtype(config.dtype, None, dist.device),
                                         dist.device)
    check_fits(model, config.policy, data.columns, "the eval shards")
    with torch.inference_mode():
        result = {"policy": config.policy, **reward_model_metrics(model.eval(), data, padding_id(tokenizer),
                                                                  config.batch_tokens, dist)}
    if dist.is_main:
        out = Path(config.out)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "eval.json", eval_json({**result, "config": config.model_dump()}))
    return result


def evaluate_policy(config: EvalConfig) -> dict[str, Any]:
    """Everything above for one policy; writes eval.json and reward_vs_kl.png into `config.out`. A
    reward model is evaluated as one (`evaluate_reward_model`)."""
    local_only("eval", {"SHARDS": config.shards, "--out": config.out})
    dist = Dist.start(config.device, timedelta(hours=2))
    if is_reward_model(config.policy):
        return evaluate_reward_model(config, dist)
    device = dist.device
    # Rank 0 judges and reports; both fail (a missing package) before any model loads.
    options = config.judge_options()
    judge = build_judge(options)[0] if options and dist.is_main else None
    tracker = open_tracker(config.report_to, Path(config.out), config.model_dump()) if dist.is_main else None
    manifest, _, data = open_shards(config.shards, need_ref=True)
    if data is None or not len(data):
        raise UserError(f"{config.shards}: no eval split (eval-*.arrow); curate with --eval-fraction > 0")
    dtype = models_dtype(config.dtype, manifest.reference, device)
    policy, tokenizer = load_causal_lm(model_dir(config.policy), config.policy, dtype, device)
    reference_dir = model_dir(config.reference)
    # Accuracy uses the stored reference log-probs, KL the --reference model: they must be one model.
    if not same_weights(manifest.reference, model_fingerprint(reference_dir, config.reference, dtype, device)):
        raise UserError(f"--reference {config.reference}: not the model the shards' reference log-probs were computed "
                        f"with ({manifest.reference.name_or_path if manifest.reference else 'none'}); pass that one")
    reference, _ = load_causal_lm(reference_dir, config.reference, dtype, device)
    stored_dtype = DTYPES[manifest.reference.dtype]
    check_tokenizer(model_dir(config.policy), config.policy, manifest.tokenizer)
    for model, name in ((policy, config.policy), (reference, config.reference)):
        check_fits(model, name, data.columns, "the eval shards")
    # Samples stop where the shards' completions end: the renderer the shards were made with.
    tokenized_with = shard_tokenize_config(manifest)
    check_template_kwargs(config.chat_template_kwargs, tokenized_with.get("chat_template_kwargs", {}), f"{config.shards}: the shards")
    renderer = make_renderer(tokenizer, tokenized_with.get("template", "auto"), config.chat_template_kwargs)
    stop_ids = stop_token_ids(renderer, policy.generation_config.eos_token_id)
    policy.eval()
    reference.eval()
    pad_id = padding_id(tokenizer)
    with torch.inference_mode():
        result: dict[str, Any] = {"policy": config.policy, **preference_metrics(policy, data, config.beta, pad_id,
                                                                                config.batch_tokens, dist, stored_dtype)}
        prompts, first_rows = eval_prompts(data, config.max_prompts)
        torch.manual_seed(config.seed + dist.rank)  # each process samples its own prompts
        samples = {"policy": sample_shared(policy, prompts, config, tokenizer, stop_ids, dist),
                   "reference": sample_shared(reference, prompts, config, tokenizer, stop_ids, dist)}
        result["kl"] = sequence_kl(policy, reference, prompts, samples["policy"], pad_id, config.batch_tokens, dist)
        if config.baseline:
            # Two models on the device at most (and a --reward-model judge): a third (7B in float32: 84 GB) would not fit an 80 GB GPU.
            del policy
            empty_device_cache(device)
            baseline, _ = load_causal_lm(model_dir(config.baseline), config.baseline, dtype, device)
            check_tokenizer(model_dir(config.baseline), config.baseline, manifest.tokenizer)
            samples["baseline"] = sample_shared(baseline.eval(), prompts, config, tokenizer, stop_ids, dist)
        if config.best_of:
            samples["best_of"] = sample_shared(reference, prompts, config, tokenizer, stop_ids, dist, n=config.best_of)
    if not dist.is_main:  # rank 0 judges and writes
        return {}
    texts = tokenizer.batch_decode(samples["policy"], skip_special_tokens=True)
    if judge is not None:
        result.update(_judged(judge, prompt_messages(config.shards, list(data.ids[first_rows])), tokenizer, samples, config))
    result.update(prompts=len(prompts), samples=len(samples["policy"]), config=config.model_dump(), examples=texts[:5])
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "eval.json", eval_json(result))
    if tracker is not None:
        tracker.start(None)
        tracker.log({"step": 0, **_flat(result)})
        tracker.close()
    if judge is not None:
        plot_reward_vs_kl([{"label": "reference", "kl": 0.0, "reward": result["reference_reward"]},
                           {"label": "policy", "kl": result["kl"], "reward": result["reward"]}], out / "reward_vs_kl.png")
    return result


def _flat(result: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """eval.json's nested numbers as tracker names: {"win_rate": {"rate": …}} → {"win_rate/rate": …}."""
    flat: dict[str, Any] = {}
    for key, value in result.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}/"))
        else:
            flat[prefix + key] = value
    return flat


def _judged(judge: Judge, messages: list[list[dict]], tokenizer: Any, samples: dict[str, list[np.ndarray]],
            config: EvalConfig) -> dict[str, Any]:
    """Mean judged reward of policy and reference samples; win rate against the baseline; Best-of-N."""
    batch_size = config.judge_options().batch_size
    scores = {name: judged_scores(judge, messages, tokenizer, completions, batch_size)
              for name, completions in samples.items()}
    result: dict[str, Any] = {"judge": config.reward or config.reward_model,
                              "reward": float(np.nanmean(scores["policy"])),
                              "reference_reward": float(np.nanmean(scores["reference"]))}
    if "baseline" in scores:
        result["win_rate"] = {"baseline": config.baseline, **win_rate(scores["policy"], scores["baseline"])}
    if "best_of" in scores:
        result["best_of_n"] = {"n": config.best_of, "reward": float(np.nanmean(np.nanmax(scores["best_of"], axis=1)))}
    return result


def summary_line(result: dict[str, Any]) -> str:
    if result.get("kind") == "reward_model":
        return (f"eval reward model {result['policy']}: pairwise accuracy {result['accuracy']:.3f}, mean margin "
                f"{result['margin']:.3f} ({result['pairs']} pairs); calibration gap {result['calibration_gap']:.3f}")
    counted = f"{result['pairs']} pairs" if "pairs" in result else f"{result['rows']} unpaired rows, reward sign"
    line = (f"eval {result['policy']}: accuracy {result['accuracy']:.3f}, margin {result['margin']:.3f} "
            f"({counted}; {result['within_rounding']:.0%} within rounding); KL {result['kl']:.3f} ({result['samples']} samples)")
    if "reward" in result:
        line += f"; reward {result['reward']:.3f} vs reference {result['reference_reward']:.3f}"
    if "win_rate" in result:
        w = result["win_rate"]
        line += f"; win rate vs {w['baseline']} {w['rate']:.3f} [{w['low']:.3f}, {w['high']:.3f}]"
    if "best_of_n" in result:
        line += f"; best-of-{result['best_of_n']['n']} reward {result['best_of_n']['reward']:.3f}"
    return line


def compare_policies(policy: str, baseline: str, prompts: list[list[dict]], judge_options: JudgeOptions, n: int,
                     temperature: float, top_p: float, max_new_tokens: int, seed: int, device: str,
                     chat_template_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Both models answer the same prompts (messages) `n` times, each under its own seed, and the
    judge scores every answer: mean reward of each, the policy's win rate against the baseline,
    and KL(policy ‖ baseline) on the policy's samples (both models share the tokenizer)."""
    judge, _ = build_judge(judge_options)
    torch_device = select_device(device)
    dtype = select_dtype("auto", torch_device)
    models = [load_causal_lm(model_dir(path), path, dtype, torch_device) for path in (policy, baseline)]
    tokenizer = models[0][1]
    renderer = make_renderer(tokenizer, "auto", chat_template_kwargs)
    rendered_ids, reasons = prompt_token_ids(renderer, prompts)
    refused = sum(reason is not None for reason in reasons)  # the template raised on them: compared without them
    prompts = [p for p, reason in zip(prompts, reasons) if reason is None]
    prompt_ids = [np.asarray(ids) for ids in rendered_ids if ids is not None]
    stop_ids = stop_token_ids(renderer, models[0][0].generation_config.eos_token_id)
    pad_id = padding_id(tokenizer)
    # Batched as generate batches (its defaults), bounded by the same token budget.
    sampling = Sampling(n, temperature, top_p, max_new_tokens, *(GenerateConfig.model_fields[f].default
                                                                 for f in ("batch_size", "batch_tokens")))
    batches = generation_batches([len(ids) for ids in prompt_ids], sampling)
    samples, scores = [], []
    with torch.inference_mode():
        for offset, (model, _) in enumerate(models):
            torch.manual_seed(seed + offset)
            completions = [c for rows in batches
                           for c in sample_completions(model.eval(), [prompt_ids[i] for i in rows], n, temperature, top_p,
                                                       max_new_tokens, stop_ids, pad_id)]
            samples.append(completions)
            scores.append(judged_scores(judge, prompts, tokenizer, completions, judge_options.batch_size))
        kl = sequence_kl(models[0][0], models[1][0], prompt_ids, samples[0], pad_id, 16_384)
    return {"policy": policy, "baseline": baseline, "judge": judge_options.name, "prompts": len(prompts),
            "prompts_refused_by_template": refused, "samples": n,
            "reward": float(np.nanmean(scores[0])), "baseline_reward": float(np.nanmean(scores[1])), "kl": kl,
            "win_rate": win_rate(scores[0], scores[1])}
