"""Reward models on the same shards: a one-output sequence classifier scores each answer at its
own last token (the end-of-turn token the shards' completions end with), read from the backbone's
hidden state there through the classifier's head.

Both layouts of `train.batching.collate_pairs`:
- padded: rows [prompt + chosen] then [prompt + rejected], right-padded; each row's last
  completion token is its last real token;
- prefix-shared: one row [prompt, chosen, rejected] per pair under the shared mask, positions
  restarting for the rejected answer, so each answer's last token sees exactly the context it
  sees in the padded layout (the prompt runs once).

A model trained here records `reward_scored_at = "completion_end"` in its config, so `prefdata
judge` scores answers with the ids tokenize stores (`schemas.render.conversation_token_ids`),
ending where training read the reward.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from schemas.errors import UserError
from train import last_layer
from train.batching import PairBatch
from train.layouts import sliding_window
from train.masks import shared_attention_mask
from train.models import load_model_tokenizer

SCORED_AT = "completion_end"  # the config attribute value: rewards read at each completion's last token


def is_reward_model(name_or_path: str | Path) -> bool:
    """A sequence classifier (what `--objective reward` trains, or any reward model), not a causal LM."""
    from transformers import AutoConfig

    from train.models import model_dir

    try:
        config = AutoConfig.from_pretrained(model_dir(str(name_or_path)))
    except (OSError, ValueError, UserError):
        return False  # not loadable: the model's loader says why in one line
    return any(name.endswith("ForSequenceClassification") for name in (config.architectures or []))


def score_margins(shards: str, ids: Any) -> np.ndarray:
    """chosen_score − rejected_score of each row's record, float32 [N] in row order (0 where the
    record has no scores), read from the record set the shards were tokenized from: the shards
    carry token ids, the records their sources' ratings."""
    import polars as pl

    from train.generate import record_files

    scores = pl.concat([pl.read_parquet(path, columns=["id", "chosen_score", "rejected_score"])
                        for path in record_files(Path(shards), "all")]).unique("id").with_columns(found=pl.lit(True))
    rows = pl.DataFrame({"id": pl.from_arrow(ids.column)}).with_row_index("row")
    joined = rows.join(scores, on="id", how="left").sort("row")
    if joined["found"].null_count():
        raise UserError(f"{shards}: {joined['found'].null_count()} rows' records are not in the record set the shards were "
                        "tokenized from; re-run tokenize from the current record set")
    return (joined["chosen_score"] - joined["rejected_score"]).fill_null(0.0).to_numpy().astype(np.float32)


def reward_head(model: torch.nn.Module) -> torch.nn.Module:
    """The classifier's output layer (transformers names it `score` for decoder models)."""
    head = getattr(model, "score", None)  # a Linear, or peft's wrapper of the one it trains whole
    if not isinstance(head, torch.nn.Module) or getattr(model.config, "num_labels", None) != 1:
        raise UserError(f"{type(model).__name__}: no one-output `score` head; a reward model is a sequence classifier "
                        "with num_labels 1 over a decoder (LlamaForSequenceClassification, Qwen2ForSequenceClassification, …)")
    return head


def _last_completion_positions(completion_mask: torch.Tensor) -> torch.Tensor:
    """[R] the last True position of each row of a [R, T] mask."""
    length = completion_mask.shape[1]
    return length - 1 - completion_mask.flip(1).int().argmax(dim=1)


class RewardScorer(torch.nn.Module):
    """A reward model seen as "rows → one reward per answer": [2B] float32, chosen then rejected
    (the order of the padded layout). A Module so DDP/FSDP can wrap it, as `SequenceScorer`.
    Its last decoder layer runs at the answers' last tokens only (`train.last_layer`), where the
    model allows it."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.reads_last_layer = last_layer.install(model)

    def forward(self, input_ids: torch.Tensor, completion_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
                segments: torch.Tensor | None = None, source: torch.Tensor | None = None,
                row_of: torch.Tensor | None = None, pair: torch.Tensor | None = None) -> torch.Tensor:
        rows, length = input_ids.shape
        if segments is None:
            # Right-padded and causal: a real token sees only real tokens, so no mask is needed (as
            # for log-probs), and each row's reward is read at its last completion token.
            mask = None
            answer_rows = torch.arange(rows, device=input_ids.device)
            answer_positions = _last_completion_positions(completion_mask)
        else:
            mask = shared_attention_mask(segments, pair, self.model.config._attn_implementation, self.model.dtype)
            batch_index, position = completion_mask.nonzero(as_tuple=True)
            flat = batch_index * length + position
            answers = 2 * (int(pair.max()) + 1)
            # Each answer's last token: the largest flat position among its completion tokens.
            last_flat = torch.full((answers,), -1, dtype=flat.dtype, device=flat.device).scatter_reduce(
                0, row_of[batch_index, position], flat, reduce="amax")
            answer_rows, answer_positions = last_flat // length, last_flat % length
        read_at = self._read_at(answer_rows, answer_positions, rows, length, mask)
        hidden = self.model.base_model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, use_cache=False,
                                       **({} if read_at is None else {last_layer.READ_AT: read_at[0]})).last_hidden_state
        if read_at is not None and hidden.shape[1] != read_at[0].positions.shape[1]:  # [R, S, H] expected, not [R, T, H]
            raise RuntimeError(f"{type(self.model).__name__}: its last layer did not receive {last_layer.READ_AT} (a "
                               "transformers release that no longer passes keyword arguments to its layers?)")
        last = hidden[answer_rows, answer_positions if read_at is None else read_at[1]]
        return reward_head(self.model)(last).squeeze(-1).float()

    def _read_at(self, answer_rows: torch.Tensor, answer_positions: torch.Tensor, rows: int, length: int,
                 mask: torch.Tensor | None) -> tuple[last_layer.ReadAt, torch.Tensor] | None:
        """(where the last layer is read, each answer's slot there), or None where it runs whole:
        a model it cannot be installed on, or padded rows longer than a sliding window (the
        model's own mask then holds the window, which a causal one built here would not)."""
        window = sliding_window(self.model.config)
        if not self.reads_last_layer or (mask is None and window is not None and length > window):
            return None
        positions, slot = last_layer.slots(answer_rows, answer_positions, rows)
        query_mask = (last_layer.causal_query_mask(positions, length, self.model.dtype) if mask is None
                      else last_layer.rows_of_mask(mask, positions))
        return last_layer.ReadAt(positions, query_mask), slot


def pair_rewards(scorer: torch.nn.Module, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen rewards [B], rejected rewards [B]) of `batch`, through `scorer` (a RewardScorer, or
    DDP/FSDP around one)."""
    shared = batch.shared
    if shared is None:
        rewards = scorer(batch.input_ids, batch.completion_mask)
    else:
        rewards = scorer(batch.input_ids, batch.completion_mask, shared.position_ids, shared.segments, shared.source,
                         shared.row_of, shared.pair)
    chosen, rejected = rewards.chunk(2)
    return chosen, rejected


def reward_disagreement(model: torch.nn.Module) -> tuple[float, float]:
    """(|our reward − the model's own forward's| on one 16-token row, the tolerance of its dtype):
    the same backbone and head, so anything beyond rounding is a transform we do not repeat."""
    from train.arch_guard import guard_row

    embeddings = model.get_input_embeddings()
    ids = guard_row(embeddings.num_embeddings, embeddings.weight.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ours = RewardScorer(model)(ids, torch.ones_like(ids, dtype=torch.bool))
            theirs = model(input_ids=ids, use_cache=False).logits[:, 0].float()
    finally:
        model.train(was_training)
    eps = torch.finfo(embeddings.weight.dtype).eps
    return float((ours - theirs).abs().max()), 1e-4 + 4 * eps * float(theirs.abs().max())


def load_reward_model(directory: Path, name_or_path: str, dtype: torch.dtype, device: torch.device,
                      attn_implementation: str | None = None, weights: bool = True) -> tuple[Any, Any]:
    """(a one-output sequence classifier on `device`, its tokenizer). A causal LM checkpoint starts
    one: its backbone, and a new head transformers initialises small (normal, σ = the config's
    initializer_range); a reward model continues with its own head. The pad id is set so the
    model's own forward (and `judge`) find each row's last real token."""
    from transformers import AutoModelForSequenceClassification

    from train.models import instantiate, padding_id

    tokenizer = load_model_tokenizer(directory, name_or_path)
    # A causal LM checkpoint has no score head: the one weight a new reward model starts at random.
    model = instantiate(AutoModelForSequenceClassification, directory, name_or_path, dtype, attn_implementation, weights,
                        "it as a reward model", frozenset({"score.weight", "score.bias"}), num_labels=1,
                        pad_token_id=padding_id(tokenizer))
    model.config.reward_scored_at = SCORED_AT
    reward_head(model)
    if weights:
        model = model.to(device)
        diff, tolerance = reward_disagreement(model)
        if not diff <= tolerance:
            raise UserError(f"model {name_or_path}: {type(model).__name__} computes its reward in a way train/rewards.py "
                            f"does not reproduce (differs by {diff:.3g} > {tolerance:.3g}); use a supported architecture")
    return model, tokenizer
