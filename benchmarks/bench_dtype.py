"""Which dtype to store the reference in: bf16 vs float32 reference log-probs of the same rows (issue 13).

    .venv/bin/python benchmarks/bench_dtype.py [--rows 200] [--max-length 512] [--size quick|full] [--json PATH]

The same model scores the same rows (LLaMA-Factory's dpo_en_demo, tokenized by prefdata) twice
through `sequence_logps`: weights in float32, and weights in bfloat16 (what `precompute-ref
--dtype auto` stores on a GPU). Reported: the per-answer difference of the summed log-probs
(mean and max |Δ|, and per token), and what it does at step 0 of a float32 policy trained against
the bf16 reference: the implicit margin β·((π_c − ref_c) − (π_r − ref_r)), which should be 0,
and the loss, which should be log 2, for β = 0.1.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BETA = 0.1


def score(model_dir: Path, shards: Path, dtype) -> tuple:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from train.batching import collate_pairs, token_budget_batches
    from train.data import open_shards
    from train.logprobs import sequence_logps

    _, data, _ = open_shards(shards, need_ref=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    chosen, rejected = np.zeros(len(data)), np.zeros(len(data))
    tokens = np.zeros((len(data), 2))
    with torch.inference_mode():
        for rows in token_budget_batches(data.columns.pair_lengths, 8192):
            out = sequence_logps(model, collate_pairs(data.columns, rows, 0))
            chosen[rows], rejected[rows] = out.chosen.numpy(), out.rejected.numpy()
            tokens[rows] = torch.stack([out.chosen_tokens, out.rejected_tokens], 1).numpy()
    return chosen, rejected, tokens


def compare(model_dir: Path, shards: Path) -> dict:
    import numpy as np
    import torch

    fp32 = score(model_dir, shards, torch.float32)
    bf16 = score(model_dir, shards, torch.bfloat16)
    diff = np.abs(np.concatenate([fp32[0] - bf16[0], fp32[1] - bf16[1]]))
    per_token = diff / np.concatenate([fp32[2][:, 0], fp32[2][:, 1]])
    margin = BETA * ((fp32[0] - bf16[0]) - (fp32[1] - bf16[1]))
    loss = np.logaddexp(0, -margin)  # −log σ(margin)
    return {"rows": len(fp32[0]), "mean_abs_diff": float(diff.mean()), "max_abs_diff": float(diff.max()),
            "mean_abs_diff_per_token": float(per_token.mean()), "mean_logp_fp32": float(np.concatenate(fp32[:2]).mean()),
            "step0_mean_abs_margin": float(np.abs(margin).mean()), "step0_max_abs_margin": float(np.abs(margin).max()),
            "step0_loss": float(loss.mean()), "log2": math.log(2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--size", choices=["quick", "full"], default="full", help="model size (bench_memory's)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from benchmarks.bench_memory import MODEL_SIZES
    from benchmarks.bench_precompute import prepare
    from train.tiny import build_model

    with tempfile.TemporaryDirectory(prefix="bench-dtype-") as tmp:
        small, shards = prepare(Path(tmp), args.rows, args.max_length)
        model = build_model(small, Path(tmp) / "model", max_positions=args.max_length, **MODEL_SIZES[args.size])
        report = compare(model, shards)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
