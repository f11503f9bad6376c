"""The most that prefix sharing, less padding and scoring only the answers can buy on one epoch of
the bench's training batches: the bounds the measured train ratios are read against (issue 14).

    .venv/bin/python benchmarks/bench_bounds.py SHARDS MODEL [--objective dpo|reward]

Counted over one epoch in batches of `bench_train.BATCH_SIZE` pairs, as each side builds them:
    ours  the trainer's own order (`LengthGroupedSampler` over the prefix-shared row lengths, seed 0),
          one row [prompt, chosen, rejected] per pair, padded to the batch's longest;
    TRL   a random order, two rows per pair (prompt + answer), padded to the batch's longest.
FLOPs of a training step (backward = 2× forward): 2 × decoder parameters per processed token;
attention 4 × T² × hidden per row and layer (both sides pass a mask, and a dense masked kernel
computes all of T × T); the LM head 2 × hidden × vocabulary per position it projects: ours only the
answer tokens, and each twice (its chunk is recomputed in backward), TRL every position.

`--objective reward` (`bounds(..., objective="reward")`): the same decoder work on each side (ours
the same prefix-shared, length-grouped rows; TRL's `RewardTrainer` the same random batches of two
padded rows per pair), no LM head, and a one-output score head (2 × hidden FLOPs per position it
projects): ours at 2 positions per pair (each answer's last token), TRL at every position it pads
to (the classifier scores every position, then picks each row's last real one); 3 × forward for
forward and backward on both sides, since nothing is recomputed. That is the layout's bound, the
whole model at every position. `flops_ours_computed` is what our trainer computes besides: its last
layer (train/last_layer.py) projects queries (forward only), keys and values at every position, and
runs the rest of the layer at the 2 read positions per pair, their queries over the row's keys.

`--objective kto` (unpaired shards: a row's continuations are its completion and its KL
completion): ours what `--kl-completions auto` picks, the same prefix-shared rows [prompt,
completion, KL completion] trained, or (prompts shorter than twice the KL completions) [prompt,
completion] trained and [prompt, KL completion] scored without gradients, in the same batches;
TRL's `KTOTrainer` in its sequential order (KTO's KL needs it), one
padded row prompt + completion trained (3 × forward) and one padded row prompt + KL completion
scored without gradients (1 × forward, the LM head at every position of both).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_train import BATCH_SIZE  # noqa: E402
from train.batching import LengthGroupedSampler, TokenColumns  # noqa: E402


@dataclass(frozen=True)
class Shape:
    """What a step's FLOPs depend on, read from the model itself."""

    decoder_parameters: int  # the layers only: not the embeddings, not the LM head
    layers: int
    hidden: int
    vocabulary: int
    query_parameters: int = 0  # one layer's query projection
    key_value_parameters: int = 0  # one layer's key and value projections

    @classmethod
    def of(cls, model_dir: Path) -> Shape:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir)
        config = model.config.get_text_config()
        layers = model.base_model.layers
        attention = layers[-1].self_attn
        count = lambda *modules: sum(p.numel() for m in modules for p in m.parameters())  # noqa: E731
        return cls(count(layers), len(layers), config.hidden_size, config.vocab_size, count(attention.q_proj),
                   count(attention.k_proj, attention.v_proj))

    def read_last_layer_flops(self, rows: int, width: int, reads: int) -> float:
        """A training step's FLOPs of the last layer read at `reads` positions of `rows` rows padded
        to `width` (train/last_layer.py): queries projected at every position (forward only: they
        are never read), keys and values there too, and at the reads the whole layer, their
        queries against the row's keys."""
        tokens = rows * width
        layer = self.decoder_parameters // self.layers
        return (2 * self.query_parameters * tokens + 3 * 2 * self.key_value_parameters * tokens
                + 3 * (2 * layer * reads + 4 * self.hidden * reads * width))


@dataclass(frozen=True)
class Bounds:
    """Totals over one epoch; each ratio TRL ÷ ours is the most that part can buy."""

    real_tokens: int  # prompt twice + both answers: what a trainer without sharing processes (TRL's counter)
    shared_tokens: int  # prompt once + both answers
    prompt_tokens: int  # the prompt, counted twice as in real_tokens
    padded_tokens_ours: int  # what goes through the model, padding included
    padded_tokens_trl: int
    flops_ours: float
    flops_trl: float
    flops_ours_computed: float  # what our trainer computes: flops_ours, but for reward's last layer read at 2 tokens per pair

    def ratios(self) -> dict[str, float]:
        return {"prompt_share": self.prompt_tokens / self.real_tokens, "sharing": self.real_tokens / self.shared_tokens,
                "padded_tokens": self.padded_tokens_trl / self.padded_tokens_ours,
                "padding_efficiency_ours": self.shared_tokens / self.padded_tokens_ours,
                "padding_efficiency_trl": self.real_tokens / self.padded_tokens_trl, "flops": self.flops_trl / self.flops_ours,
                "flops_computed": self.flops_trl / self.flops_ours_computed}


def _decoder_flops(shape: Shape, rows: int, width: int) -> float:
    """A training step's decoder FLOPs for `rows` rows padded to `width` (backward = 2× forward)."""
    forward = 2 * shape.decoder_parameters * rows * width + 4 * shape.layers * shape.hidden * rows * width**2
    return 3 * forward


OBJECTIVES = ("dpo", "reward", "kto")


def bounds(columns: TokenColumns, shape: Shape, batch_size: int = BATCH_SIZE, objective: str = "dpo") -> Bounds:
    """From the train split's token columns: the row lengths each layout builds are theirs.
    `objective` picks the head and TRL's layout: "dpo" the LM head, "reward" a one-output score
    head, "kto" unpaired rows against KTOTrainer's two rows (trained, KL-scored)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r}: one of {OBJECTIVES}")
    shared, padded_pair = columns.shared_lengths, columns.pair_lengths
    ours = LengthGroupedSampler(shared, batch_size, seed=0).epoch_batches(0)
    order = np.arange(len(columns)) if objective == "kto" else np.random.default_rng(0).permutation(len(columns))
    trl = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

    head = 2 * shape.hidden * shape.vocabulary  # forward FLOPs of projecting one position
    # Ours: 4 head-sized matmuls per trained answer token (forward, the chunk's recomputed forward
    # in backward, and the two gradients); TRL: 3 per position it pads to (forward and the two gradients).
    continuations = columns.chosen.lengths + columns.rejected.lengths
    if objective == "kto" and columns.second_apart_is_cheaper():  # what `--kl-completions auto` picks
        ours_padded, decoder_ours = _trained_and_scored(shape, ours, *_kto_rows(columns))
        head_ours = head * (4 * int(columns.chosen.lengths.sum()) + int(columns.rejected.lengths.sum()))
    else:
        ours_padded = sum(len(b) * int(shared[b].max()) for b in ours)
        decoder_ours = sum(_decoder_flops(shape, len(b), int(shared[b].max())) for b in ours)
        head_ours = 4 * head * int(continuations.sum())
    if objective == "kto":
        trained_padded, scored_padded = (sum(len(b) * int(lengths[b].max()) for b in trl) for lengths in _kto_rows(columns))
        trl_padded, decoder_trl = _trained_and_scored(shape, trl, *_kto_rows(columns))
        head_trl = head * (3 * trained_padded + scored_padded)
    else:
        trl_padded = sum(2 * len(b) * int(padded_pair[b].max()) for b in trl)
        decoder_trl = sum(_decoder_flops(shape, 2 * len(b), int(padded_pair[b].max())) for b in trl)
        if objective == "reward":
            head = 2 * shape.hidden  # one output
            head_ours = 3 * head * 2 * len(columns)  # each answer's last token, no recompute
        head_trl = 3 * head * trl_padded  # every padded position of both rows
    flops_ours = decoder_ours + head_ours
    computed = flops_ours
    if objective == "reward":  # the last layer read at each answer's last token instead of run whole
        computed -= sum(_decoder_flops(shape, len(b), int(shared[b].max())) / shape.layers
                        - shape.read_last_layer_flops(len(b), int(shared[b].max()), 2 * len(b)) for b in ours)
    return Bounds(real_tokens=int(columns.real_tokens.sum()), shared_tokens=int(shared.sum()),
                  prompt_tokens=int(2 * columns.prompt.lengths.sum()), padded_tokens_ours=ours_padded, padded_tokens_trl=trl_padded,
                  flops_ours=flops_ours, flops_trl=decoder_trl + head_trl, flops_ours_computed=computed)


def _kto_rows(columns: TokenColumns) -> tuple[np.ndarray, np.ndarray]:
    """Row lengths of an unpaired row's two rows: prompt + completion, prompt + KL completion."""
    return columns.prompt.lengths + columns.chosen.lengths, columns.prompt.lengths + columns.rejected.lengths


def _trained_and_scored(shape: Shape, batches: list[np.ndarray], trained: np.ndarray, scored: np.ndarray) -> tuple[int, float]:
    """(padded tokens, decoder FLOPs) of batches that train one padded row per item and score
    another without gradients (forward only: ⅓ of a training step's FLOPs)."""
    padded = sum(len(b) * (int(trained[b].max()) + int(scored[b].max())) for b in batches)
    flops = sum(_decoder_flops(shape, len(b), int(trained[b].max())) + _decoder_flops(shape, len(b), int(scored[b].max())) / 3
                for b in batches)
    return padded, flops


def shard_bounds(shards: Path, model: Path, objective: str = "dpo") -> Bounds:
    from train.data import open_shards

    _, train_split, _ = open_shards(shards, need_ref=False)
    return bounds(train_split.columns, Shape.of(model), objective=objective)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shards", type=Path)
    parser.add_argument("model", type=Path)
    parser.add_argument("--objective", choices=OBJECTIVES, default="dpo",
                        help="dpo: the LM head; reward: a one-output score head; kto: unpaired shards against KTOTrainer")
    args = parser.parse_args()
    result = shard_bounds(args.shards, args.model, args.objective)
    print(json.dumps({**asdict(result), **result.ratios()}, indent=2))


if __name__ == "__main__":
    main()
