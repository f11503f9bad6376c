"""THE sequence log-prob: one definition for the reference pass and the trainer's policy pass.

log π(y|x) = sum over the completion tokens of log p(token | everything before it), in float32:
the first completion token is predicted from the last prompt token, EOS is included, prompt and
padding are not (DESIGN.md). Chosen and rejected rows go through one forward pass (`PairBatch`).

Memory: the model's own forward would project EVERY position to the vocabulary. Here the backbone
runs alone, only the hidden states that predict a completion token are projected, and they are
projected in chunks of at most `LOGITS_CHUNK_BYTES` of float32 logits, each reduced at once to
"logit of the label − logsumexp". With gradients on, each chunk is checkpointed, so backward
recomputes its logits instead of keeping them all. bf16/fp16 models: the projection runs in the
model's dtype and each chunk is upcast to float32 before the softmax.

Prefix sharing (`collate_pairs(..., shared=True)`): instead of the two padded rows
[prompt + chosen], [prompt + rejected], a pair is ONE row [prompt, chosen, rejected]. Position ids
restart at the end of the prompt for the rejected part and a block mask keeps rejected tokens from
attending to chosen ones, so every answer token sees the context it sees in the padded layout; the
first rejected token is scored from the last prompt token's hidden state. The prompt goes through
the model once, forward and backward. Used where it is exact (train/layouts.py,
`prefix_sharing_exact`: attention that takes an arbitrary mask, no sliding window shorter than a
pair); equal to the padded layout within float32 rounding (tests/test_prefix_sharing.py). The mask
(train/masks.py) is dense for SDPA and eager attention, a FlexAttention `BlockMask` (masked tiles
skipped) where the model runs FlexAttention: packed rows on CUDA (`train.models.attention_kernel`).

Because the model's own forward is skipped, `_final_logits` repeats the logit transforms some
architectures apply there; train/arch_guard.py catches an architecture with one it does not know.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from train.batching import PairBatch
from train.masks import shared_attention_mask

LOGITS_CHUNK_BYTES = 64 << 20


@dataclass
class SequenceLogps:
    chosen: torch.Tensor  # [B] float32, log π(chosen | prompt)
    rejected: torch.Tensor  # [B] float32
    chosen_tokens: torch.Tensor  # [B] int64, completion tokens scored (IPO's length average)
    rejected_tokens: torch.Tensor  # [B] int64


def _final_logits(logits: torch.Tensor, config: Any) -> torch.Tensor:
    """What some architectures do to the LM head's output inside their forward; we bypass that
    forward, so we repeat it here (Cohere: logit_scale, Granite: logits_scaling, Gemma 2/3:
    final_logit_softcapping)."""
    scale = getattr(config, "logit_scale", None)
    if scale is not None:
        logits = logits * scale
    divisor = getattr(config, "logits_scaling", None)
    if divisor is not None:
        logits = logits / divisor
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _chunk_logps(head: torch.nn.Module, config: Any, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = _final_logits(head(hidden).float(), config)
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def _token_logps(model: Any, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels[i] | hidden[i]) for N positions, float32 [N], chunk by chunk."""
    head = model.get_output_embeddings()
    config = model.config.get_text_config()
    chunk = max(1, LOGITS_CHUNK_BYTES // (4 * head.weight.shape[0]))
    pieces = []
    for start in range(0, labels.shape[0], chunk):
        args = (head, config, hidden[start : start + chunk], labels[start : start + chunk])
        # Under autograd, keep only the chunk's hidden states; backward recomputes its logits.
        pieces.append(checkpoint(_chunk_logps, *args, use_reentrant=False) if torch.is_grad_enabled() else _chunk_logps(*args))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


class SequenceScorer(torch.nn.Module):
    """A causal LM seen as "rows → per-row completion log-prob sums". A Module so that the trainer
    can wrap it whole in DDP/FSDP (`DDP(SequenceScorer(model))`): calling the wrapper's forward
    is what lets DDP synchronise gradients, and this forward is where the backbone runs."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, completion_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
                segments: torch.Tensor | None = None, source: torch.Tensor | None = None,
                row_of: torch.Tensor | None = None, pair: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """→ (sum of completion-token log-probs [R] float32, completion tokens scored [R]).

        Padded layout (`segments` None): no attention mask on purpose: rows are right-padded and
        attention is causal, so a real token only ever attends to real tokens before it; padding
        only affects padded positions, which are never scored. Without a mask the attention takes
        its plain causal kernel (measured ~15% faster on CPU, bit-identical values).
        Prefix-shared layout: see `_shared_logps`."""
        if segments is not None:
            return self._shared_logps(input_ids, completion_mask, position_ids, segments, source, row_of, pair)
        per_position = self.position_logps(input_ids, completion_mask)
        return per_position.sum(dim=1), completion_mask[:, 1:].sum(dim=1)

    def _shared_logps(self, input_ids: torch.Tensor, completion_mask: torch.Tensor, position_ids: torch.Tensor,
                      segments: torch.Tensor, source: torch.Tensor, row_of: torch.Tensor,
                      pair: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of B pairs [prompt, chosen, rejected] (one or several per row) → the 2B rows' sums
        of the padded layout.

        The rejected tokens may not see the chosen ones, no token sees another pair's, and
        positions restart where the prompt ends (and where each packed pair starts), so each
        answer's tokens see exactly the context (same tokens, same positions) they see in the
        padded layout: the same numbers up to rounding, with the prompt run once."""
        mask = shared_attention_mask(segments, pair, self.model.config._attn_implementation, self.model.dtype)
        out = self.model.base_model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, use_cache=False)
        batch_index, position = completion_mask.nonzero(as_tuple=True)
        hidden = out.last_hidden_state[batch_index, source[batch_index, position]]
        token_logps = _token_logps(self.model, hidden, input_ids[batch_index, position])
        rows = row_of[batch_index, position]
        shape = (2 * (int(pair.max()) + 1), input_ids.shape[1])
        # Each (row, position) is written once: a dense sum, deterministic on GPU like the padded path.
        per_position = torch.zeros(shape, dtype=torch.float32, device=input_ids.device).index_put((rows, position), token_logps)
        scored = torch.zeros(shape, dtype=torch.bool, device=input_ids.device).index_put(
            (rows, position), torch.ones_like(rows, dtype=torch.bool))
        return per_position.sum(dim=1), scored.sum(dim=1)

    def position_logps(self, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
        """log p(token t+1 | tokens ≤ t) at each scored position, 0 elsewhere: [R, T-1] float32."""
        out = self.model.base_model(input_ids=input_ids, use_cache=False)
        # Position t predicts token t+1: a completion token at t+1 is scored from hidden state t.
        targets = completion_mask[:, 1:]
        token_logps = _token_logps(self.model, out.last_hidden_state[:, :-1][targets], input_ids[:, 1:][targets])
        # A dense [R, T-1] float32 sum (not index_add): deterministic on GPU, so re-runs match bit for bit.
        per_position = torch.zeros(targets.shape, dtype=torch.float32, device=input_ids.device)
        return per_position.masked_scatter(targets, token_logps)


def sequence_logps(model: torch.nn.Module, batch: PairBatch) -> SequenceLogps:
    """Chosen and rejected log-probs of `batch` (already on the model's device, right-padded as
    `collate_pairs` makes it) in one forward.

    `model` is a causal LM, a `SequenceScorer`, or a DDP/FSDP wrapper around a `SequenceScorer`.
    Works under `torch.inference_mode()` (reference pass) and with gradients (trainer). A batch
    whose second continuations were collated apart (`PairBatch.apart`) scores them in a second
    forward, without gradients."""
    if batch.apart is not None:
        first = sequence_logps(model, dataclasses.replace(batch, apart=None))
        with torch.no_grad():
            second = sequence_logps(model, batch.apart)
        return SequenceLogps(first.chosen, second.chosen, first.chosen_tokens, second.chosen_tokens)
    is_scorer = isinstance(getattr(model, "module", model), SequenceScorer)
    scorer = model if is_scorer else SequenceScorer(model)
    shared = batch.shared
    if shared is None:
        logps, tokens = scorer(batch.input_ids, batch.completion_mask)
    else:
        logps, tokens = scorer(batch.input_ids, batch.completion_mask, shared.position_ids, shared.segments,
                               shared.source, shared.row_of, shared.pair)
    chosen, rejected = logps.chunk(2)
    chosen_tokens, rejected_tokens = tokens.chunk(2)
    return SequenceLogps(chosen, rejected, chosen_tokens, rejected_tokens)
