"""`prefdata eval` / `python -m train.eval`: how far a policy moved from its reference, and whether
that bought reward.

- Preference metrics on the eval shards: implicit reward β·(log π − log π_ref) of chosen and
  rejected (π_ref = the stored `ref_*_logps`), its accuracy and mean margin.
- Generation: completions sampled for the eval prompts from the policy and from the reference, scored
  by a reward function given by import path, and the sequence-level KL(π‖π_ref) estimated as the
  mean over policy samples of log π(y|x) − log π_ref(y|x). Samples are scored with THE log-prob
  function (`train.logprobs.sequence_logps` over `collate_pairs` batches), so the KL uses exactly
  the log-probs that training and precompute-ref use.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field

from schemas.errors import UserError
from schemas.io import write_text_atomic
from train.batching import TokenColumns, collate_pairs, token_budget_batches
from train.data import SplitData, open_shards
from train.logprobs import sequence_logps
from train.losses import LossParams, preference_loss
from train.models import check_tokenizer, load_causal_lm, model_dir, model_fingerprint, same_weights

# A string, not an import: `train` never imports `prefdata`; the function is loaded only when used.
DEFAULT_REWARD = "prefdata.demo_data:lexicon_reward"


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shards: str  # precompute-ref output; its eval split is used
    policy: str
    reference: str
    out: str
    reward: str = DEFAULT_REWARD  # "module:function", text → float
    beta: float = Field(0.1, gt=0)  # scales the implicit reward's margin (accuracy does not depend on it)
    samples: int = Field(4, gt=0)  # completions per prompt and model
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(32, gt=0)
    max_prompts: int | None = Field(None, gt=0)
    batch_tokens: int = Field(16_384, gt=0)
    seed: int = 0


def load_reward(path: str) -> Callable[[str], float]:
    module_name, _, function = path.partition(":")
    try:
        return getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError, ValueError):
        raise UserError(f"--reward {path}: cannot import it; give module:function, e.g. {DEFAULT_REWARD}") from None


# A pair is won when its log-ratio margin Δchosen − Δrejected exceeds this: below it the policy and
# the stored reference differ by float32 rounding (other batching, prefix sharing), which is a tie.
TIE_TOLERANCE = 1e-3


def preference_metrics(model: Any, data: SplitData, beta: float, pad_id: int, batch_tokens: int) -> dict[str, float]:
    """Implicit-reward accuracy and mean margin over the whole split, against the stored reference."""
    accuracy = margin = 0.0
    for rows in token_budget_batches(data.columns.pair_lengths, batch_tokens):
        logps = sequence_logps(model, collate_pairs(data.columns, rows, pad_id))
        ref_chosen, ref_rejected = (torch.from_numpy(x) for x in data.ref_logps(rows))
        _, metrics = preference_loss(logps.chosen, logps.rejected, ref_chosen, ref_rejected, logps.chosen_tokens,
                                     logps.rejected_tokens, {"sigmoid": 1.0}, LossParams(beta=beta))
        logratio_margin = (logps.chosen - ref_chosen) - (logps.rejected - ref_rejected)
        accuracy += (logratio_margin > TIE_TOLERANCE).sum().item()
        margin += metrics["rewards/margins"].item() * len(rows)
    return {"accuracy": accuracy / len(data), "margin": margin / len(data), "pairs": len(data)}


def eval_prompts(data: SplitData, max_prompts: int | None) -> list[np.ndarray]:
    """The distinct prompts of the split (several pairs can share one), in first-seen order."""
    seen: dict[bytes, np.ndarray] = {}
    for i in range(len(data)):
        ids = data.columns.prompt.row(i)
        seen.setdefault(ids.tobytes(), ids)
    return list(seen.values())[:max_prompts]


def sample(model: Any, prompts: list[np.ndarray], config: EvalConfig, tokenizer: Any) -> list[np.ndarray]:
    """`config.samples` completions per prompt (prompt-major), each cut after its first EOS (kept).
    A completion without EOS within max_new_tokens stays cut there: its log-prob is then that of
    the truncated sequence, which is exactly what was sampled."""
    pad_id = tokenizer.pad_token_id
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, prompt in enumerate(prompts):  # left padding: generation continues from the last column
        ids[i, width - len(prompt):] = torch.from_numpy(prompt.astype(np.int64))
        mask[i, width - len(prompt):] = 1
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=config.temperature,
                         top_k=0, top_p=1.0, max_new_tokens=config.max_new_tokens,
                         num_return_sequences=config.samples, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id)
    completions = []
    for row in out[:, width:].numpy():
        ends = np.flatnonzero(row == tokenizer.eos_token_id)
        completions.append(row[: ends[0] + 1] if len(ends) else row)
    return completions


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
    for rows in token_budget_batches(columns.pair_lengths, batch_tokens):
        result[rows] = sequence_logps(model, collate_pairs(columns, rows, pad_id)).chosen.numpy()
    return result


def sequence_kl(policy: Any, reference: Any, prompts: list[np.ndarray], policy_samples: list[np.ndarray],
                pad_id: int, batch_tokens: int) -> float:
    """KL(π‖π_ref) ≈ mean over y ~ π of log π(y|x) − log π_ref(y|x) (an unbiased estimate)."""
    policy_logps = completion_logps(policy, prompts, policy_samples, pad_id, batch_tokens)
    reference_logps = completion_logps(reference, prompts, policy_samples, pad_id, batch_tokens)
    return float(np.mean(policy_logps - reference_logps))


def _mean_reward(reward: Callable[[str], float], tokenizer: Any, completions: list[np.ndarray]) -> tuple[float, list[str]]:
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return float(np.mean([reward(t) for t in texts])), texts


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


def evaluate_policy(config: EvalConfig) -> dict[str, Any]:
    """Everything above for one policy; writes eval.json and reward_vs_kl.png into `config.out`."""
    reward = load_reward(config.reward)
    manifest, _, data = open_shards(config.shards, need_ref=True)
    if data is None or not len(data):
        raise UserError(f"{config.shards}: no eval split (eval-*.arrow); curate with --eval-fraction > 0")
    device = torch.device("cpu")
    policy, tokenizer = load_causal_lm(model_dir(config.policy), config.policy, torch.float32, device)
    reference_dir = model_dir(config.reference)
    # Accuracy uses the stored reference log-probs, KL the --reference model: they must be one model.
    if not same_weights(manifest.reference, model_fingerprint(reference_dir, config.reference, torch.float32, device)):
        raise UserError(f"--reference {config.reference}: not the model the shards' reference log-probs were computed "
                        f"with ({manifest.reference.name_or_path if manifest.reference else 'none'}); pass that one")
    reference, _ = load_causal_lm(reference_dir, config.reference, torch.float32, device)
    check_tokenizer(model_dir(config.policy), config.policy, manifest.tokenizer)
    policy.eval()
    reference.eval()
    pad_id = tokenizer.pad_token_id
    with torch.inference_mode():
        result: dict[str, Any] = {"policy": config.policy, **preference_metrics(policy, data, config.beta, pad_id,
                                                                                config.batch_tokens)}
        prompts = eval_prompts(data, config.max_prompts)
        torch.manual_seed(config.seed)
        policy_samples = sample(policy, prompts, config, tokenizer)
        reference_samples = sample(reference, prompts, config, tokenizer)
        result["kl"] = sequence_kl(policy, reference, prompts, policy_samples, pad_id, config.batch_tokens)
    result["reward"], texts = _mean_reward(reward, tokenizer, policy_samples)
    result["reference_reward"], _ = _mean_reward(reward, tokenizer, reference_samples)
    result.update(prompts=len(prompts), samples=len(policy_samples), config=config.model_dump(), examples=texts[:5])
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "eval.json", json.dumps(result, indent=2))
    plot_reward_vs_kl([{"label": "reference", "kl": 0.0, "reward": result["reference_reward"]},
                       {"label": "policy", "kl": result["kl"], "reward": result["reward"]}], out / "reward_vs_kl.png")
    return result


def summary_line(result: dict[str, Any]) -> str:
    return (f"eval {result['policy']}: accuracy {result['accuracy']:.3f}, margin {result['margin']:.3f} "
            f"({result['pairs']} pairs); reward {result['reward']:.3f} vs reference {result['reference_reward']:.3f}, "
            f"KL {result['kl']:.3f} ({result['samples']} samples)")


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m train.eval", description=__doc__.splitlines()[0])
    for name, field in EvalConfig.model_fields.items():
        kind = field.annotation if field.annotation in (str, float) else int  # int | None → int
        parser.add_argument("--" + name.replace("_", "-"), dest=name, required=field.is_required(), type=kind)
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    try:
        print(summary_line(evaluate_policy(EvalConfig(**args))))
    except UserError as exc:
        print(f"train.eval: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
