"""Reward-model training throughput and memory: `--objective reward` against TRL 1.x
`RewardTrainer` (issue 26, item 6).

    .venv/bin/python benchmarks/bench_reward.py [--rows 200] [--max-length 768] [--steps N] [--repeats 3] [--rows-set uniform|hh]

Like for like, as `bench_train.py` for DPO: the same rows (`bench_precompute.prepare`: the same
~4M-parameter Llama checkpoint and tokenizer; TRL trains on exactly our shards' token ids), a
one-output sequence classifier made from that checkpoint on both sides (the backbone loaded, a new
score head), batch 8 pairs, float32, the same learning rate, one epoch by default, and no
activation checkpointing on either side (RewardConfig's default turns it on; it is set off here):
    ours-reward  `train()` with objective reward: one prefix-shared row [prompt, chosen, rejected]
                 per pair, the trainer's length-grouped batches, each answer scored at its last token
                 and the last decoder layer run there only (train/last_layer.py)
    trl-reward   TRL `RewardTrainer`: two rows per pair (prompt + chosen, prompt + rejected, its
                 `DataCollatorForPreference` padding them), random batches, the classifier's own
                 forward (the score head at every position, read at each row's last real token)
Each run is its own subprocess, alternating; its peak RSS is that process's own high-water mark
(VmHWM, `process_memory.py`). Tokens/s = real tokens (prompt twice + both answers: TRL's own
counter, attention-mask sums) ÷ the time of steps 2..N (step 1's warm-up, loading and saving left
out on both sides). The FLOP bound for this layout against TRL's on the same batches is
`bench_bounds.py --objective reward`: the layout's, the whole model at every position (the
target), and beside it the FLOPs ours computes with its last layer read at 2 tokens per pair.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import bench_train  # noqa: E402
from benchmarks.bench_precompute import bench_device, prepare, trl_step_window, trl_token_ids  # noqa: E402
from benchmarks.bench_train import BATCH_SIZE, LEARNING_RATE  # noqa: E402
from benchmarks.process_memory import peak_rss_mib  # noqa: E402

VARIANTS = ("ours-reward", "trl-reward")
# What each side runs, for the table's rows.
OURS = "ours --objective reward (prefix-shared rows, length-grouped, scored at 2 positions per pair, the last layer there only)"
PEER = "TRL RewardTrainer (2 padded rows per pair, random batches)"


def train_ours(model: Path, shards: Path, steps: int, out: Path) -> dict:
    """Our trainer with objective reward, logging every step; steps 2..N are the timed window."""
    from train.config import TrainConfig
    from train.loop import train

    config = TrainConfig(shards=str(shards), model=str(model), out=str(out), objective="reward", batch_size=BATCH_SIZE,
                         max_steps=steps, log_every=1, learning_rate=LEARNING_RATE, gradient_checkpointing=False,
                         prefix_sharing="auto", device=bench_device(), dtype="float32")
    train(config)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "tokens_per_s" in r and r["step"] > 1]
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in timed)
    return {"tokens_per_s": sum(r["tokens"] for r in timed) / seconds,
            "computed_tokens_per_s": sum(r["computed_tokens"] for r in timed) / seconds}


def trl_rows(shards: Path) -> dict[str, list]:
    """Our shards' pairs as RewardTrainer's pre-tokenized columns: prompt + answer ids per side."""
    ids = trl_token_ids(shards)
    return {side: [p + a for p, a in zip(ids["prompt_ids"], ids[f"{side}_ids"])] for side in ("chosen", "rejected")}


def train_trl(model: Path, shards: Path, steps: int, out: Path) -> dict:
    """TRL's `train()`, timed by a callback from the end of step 1 to the end of step N over the
    real tokens TRL counts itself."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from train.models import padding_id

    tokenizer = AutoTokenizer.from_pretrained(model)
    classifier = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1, dtype=torch.float32,
                                                                    pad_token_id=padding_id(tokenizer))
    rows = trl_rows(shards)
    dataset = Dataset.from_dict({"chosen_ids": rows["chosen"], "rejected_ids": rows["rejected"]})
    args = RewardConfig(output_dir=str(out), per_device_train_batch_size=BATCH_SIZE, max_steps=steps, learning_rate=LEARNING_RATE,
                        bf16=False, use_cpu=bench_device() == "cpu", gradient_checkpointing=False, max_length=None,
                        report_to="none", disable_tqdm=True, save_strategy="no", logging_steps=steps)
    trainer = RewardTrainer(model=classifier, args=args, train_dataset=dataset, processing_class=tokenizer)
    window = trl_step_window(trainer, steps)
    trainer.train()
    return {"tokens_per_s": window.tokens_per_s}


def run_child(variant: str, model: Path, shards: Path, steps: int, out: Path) -> dict:
    """One variant in this process; adds this process's own peak RSS."""
    result = train_ours(model, shards, steps, out) if variant == "ours-reward" else train_trl(model, shards, steps, out)
    return {**result, "peak_rss_mib": peak_rss_mib()}


def compare(model: Path, shards: Path, steps: int, repeats: int, work: Path) -> dict[str, dict]:
    """Both variants `repeats` times, alternating, each in its own process: bench_train's runner."""
    return bench_train.compare(model, shards, steps, repeats, work, VARIANTS, __file__)


def table_rows(rows_set: str, results: dict[str, dict], limits, row) -> list[dict]:
    """The bench table's rows for one row set: tokens/s and peak RSS beside TRL's (targets: at least
    the FLOP bound of `limits`, a `bench_bounds.Bounds` for objective reward; memory ≤ TRL's), the
    bound's own rows, and the FLOPs ours computes (its last layer read at the scored tokens).
    `row` is run_all.row."""
    bound, stage = limits.ratios()["flops"], f"train reward model [{rows_set}], no checkpointing either side"
    return [*bench_train.peer_rows(stage, f"tokens/s, {OURS}", "tokens_per_s", results["ours-reward"], results["trl-reward"],
                                   PEER, f"≥ {bound:.2f}× (FLOP bound of the layout)", limits, row),
            row(stage, "bound: training GFLOPs, one epoch, ours as computed (last layer at the scored tokens)",
                limits.flops_ours_computed / 1e9, limits.flops_trl / 1e9, PEER, "—", False)]


def main() -> None:
    bench_train.peer_main(__doc__, __file__, VARIANTS, prepare, run_child, "reward", "tokens_per_s", "tokens/s")


if __name__ == "__main__":
    main()
