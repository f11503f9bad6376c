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
the model once, forward and backward. Used where it is exact (`prefix_sharing_exact`: attention
that takes an arbitrary mask, no sliding window shorter than a pair); equal to the padded layout
within float32 rounding (tests/test_prefix_sharing.py). The mask is dense for SDPA and eager
attention, a FlexAttention `BlockMask` (masked tiles skipped) where the model runs FlexAttention:
packed rows on CUDA (`train.models.attention_kernel`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from train.batching import FLEX_TILE, PairBatch

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


def shared_attention_mask(segments: torch.Tensor, pair: torch.Tensor, attn_implementation: str,
                          dtype: torch.dtype) -> Any:
    """The prefix-shared layout's attention rule (`allowed_positions`) in the form the kernel
    takes: a `BlockMask` for FlexAttention, else an additive [R, 1, T, T] mask in the model's
    dtype, for SDPA too. SDPA turns a boolean mask into this additive one inside every call: per
    layer, forward and backward, and under autograd each layer keeps its own copy for backward;
    built once here, every layer reads the same tensor (3.7% faster HH training steps on CPU,
    the same values: a masked score is 0 after the softmax either way)."""
    if attn_implementation == "flex_attention":
        return _flex_block_mask(segments, pair)
    allowed = allowed_positions(segments, pair)
    return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill(~allowed, torch.finfo(dtype).min)


def allowed_positions(segments: torch.Tensor, pair: torch.Tensor) -> torch.Tensor:
    """[R, 1, T, T] bool, True where a query may attend to a key: causal, block-diagonal over the
    pairs packed into a row, padding never attended to, and rejected tokens (segment 2) never
    attending to chosen ones (segment 1). A padding query attends to itself, so no softmax row is
    empty (an empty one is NaN, and NaN spreads into gradients even where nothing reads it)."""
    length = segments.shape[1]
    query, key = segments[:, :, None], segments[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    allowed = causal & (key >= 0) & (pair[:, :, None] == pair[:, None, :]) & ~((query == 2) & (key == 1))
    allowed |= torch.eye(length, dtype=torch.bool, device=segments.device)
    return allowed[:, None]


def _flex_block_mask(segments: torch.Tensor, pair: torch.Tensor) -> Any:
    """The same rule as a FlexAttention `BlockMask`: evaluated per (query, key) inside the kernel,
    and tiles where it is False everywhere (other pairs, the future) are skipped, not computed.

    The tiles are found from each tile's range of pair ids, O((T / 128)²), instead of by
    `create_block_mask`, which evaluates the rule at all T² points (int64 intermediates of T²
    elements: gigabytes for a 16k-token packed row). A pair's tokens are contiguous, so a query
    tile can see a key tile only if their pair ranges overlap (or it is the diagonal: padding
    attends to itself). A tile below the diagonal is full (no rule needed inside) when both tiles
    hold one and the same pair, no padding, and no rejected query meets a chosen key."""
    from torch.nn.attention.flex_attention import BlockMask

    segment = segments.long()

    def allowed(row: torch.Tensor, head: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        same_pair_causal = (key <= query) & (pair[row, query] == pair[row, key]) & (segment[row, key] >= 0)
        rejected_on_chosen = (segment[row, query] == 2) & (segment[row, key] == 1)
        return (same_pair_causal & ~rejected_on_chosen) | (query == key)

    rows, length = segments.shape
    tiles = -(-length // FLEX_TILE)

    def by_tile(per_token: torch.Tensor) -> torch.Tensor:  # [rows, T] → [rows, tiles, FLEX_TILE], -1 past the end
        return torch.nn.functional.pad(per_token, (0, tiles * FLEX_TILE - length), value=-1).view(rows, tiles, FLEX_TILE)

    tiled, tiled_segment = by_tile(pair), by_tile(segment)
    real = tiled >= 0
    low = torch.where(real, tiled, torch.iinfo(torch.int64).max).amin(-1)  # [rows, tiles]; no real token: an empty range
    high = torch.where(real, tiled, -1).amax(-1)
    q_low, q_high, k_low, k_high = low[:, :, None], high[:, :, None], low[:, None, :], high[:, None, :]
    index = torch.arange(tiles, device=pair.device)
    below, diagonal = index[None, :] < index[:, None], index[None, :] == index[:, None]  # [q tile, kv tile]
    needed = ((torch.maximum(q_low, k_low) <= torch.minimum(q_high, k_high)) & below) | diagonal
    one_pair = real.all(-1) & (low == high)
    has_chosen, has_rejected = (tiled_segment == 1).any(-1), (tiled_segment == 2).any(-1)
    full = (below & one_pair[:, :, None] & one_pair[:, None, :] & (q_low == k_low)
            & ~(has_rejected[:, :, None] & has_chosen[:, None, :]))
    partial = needed & ~full

    def blocks(marked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # per query tile: how many kv tiles are marked, and their indices first (a stable sort puts True first)
        order = torch.argsort((~marked).to(torch.int8), dim=-1, stable=True)
        return marked.sum(-1, dtype=torch.int32)[:, None], order.to(torch.int32)[:, None]

    (partial_count, partial_index), (full_count, full_index) = blocks(partial), blocks(full)
    return BlockMask.from_kv_blocks(partial_count, partial_index, full_count, full_index, BLOCK_SIZE=FLEX_TILE,
                                    mask_mod=allowed, seq_lengths=(length, length))


SHARING_ATTENTION = ("sdpa", "eager", "flex_attention")  # the kernels that take an arbitrary mask


def prefix_sharing_obstacle(model: torch.nn.Module, pair_lengths: np.ndarray) -> str | None:
    """Why the prefix-shared layout would not give the padded layout's numbers for this model and
    these pairs, or None where it does: its attention must take a custom mask, and no sliding
    window may cut a pair's context (a custom mask replaces the model's window, so it must not
    matter: every pair within it)."""
    config = model.config
    if config._attn_implementation not in SHARING_ATTENTION:
        return f"its attention {config._attn_implementation} takes no mask"
    text_config = config.get_text_config()
    window = getattr(text_config, "sliding_window", None)
    uses_window = window is not None and getattr(text_config, "use_sliding_window", True) is not False
    longest = int(pair_lengths.max()) if len(pair_lengths) else 0
    if uses_window and longest > window:
        return f"a pair of {longest} tokens exceeds its sliding window of {window}"
    return None


def prefix_sharing_exact(model: torch.nn.Module, pair_lengths: np.ndarray) -> bool:
    return prefix_sharing_obstacle(model, pair_lengths) is None


def check_packing(packing: bool, shared: bool, prefix_sharing: str, model: torch.nn.Module,
                  pair_lengths: np.ndarray) -> None:
    """Packing places prefix-shared pairs side by side: without that layout there is nothing to pack.
    The refusal names the architecture and what stops it, so the user knows whether a flag
    (--prefix-sharing, --attn-implementation) or the model itself is the reason."""
    if packing and not shared:
        from schemas.errors import UserError

        why = "--prefix-sharing off" if prefix_sharing == "off" else prefix_sharing_obstacle(model, pair_lengths)
        raise UserError(f"--packing needs the prefix-shared layout, which {model.config.model_type} "
                        f"({type(model).__name__}) cannot use in this run ({why}); drop --packing")


def sequence_logps(model: torch.nn.Module, batch: PairBatch) -> SequenceLogps:
    """Chosen and rejected log-probs of `batch` (already on the model's device, right-padded as
    `collate_pairs` makes it) in one forward.

    `model` is a causal LM, a `SequenceScorer`, or a DDP/FSDP wrapper around a `SequenceScorer`.
    Works under `torch.inference_mode()` (reference pass) and with gradients (trainer)."""
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


# ---------------------------------------------------------------------------------------------
# The architecture guard: `_final_logits` repeats the transforms we know; this catches the rest.

GUARD_TOKENS = 16


def _guard_row(vocab_size: int, device: torch.device) -> torch.Tensor:
    # Fixed pseudo-random ids: the same row on every run and rank, spread over the vocabulary.
    generator = torch.Generator().manual_seed(13)
    return torch.randint(0, vocab_size, (1, GUARD_TOKENS), generator=generator).to(device)


def forward_disagreement(model: torch.nn.Module) -> tuple[float, float]:
    """(largest |Δ| between our per-token log-probs and those of the model's own `forward` +
    float32 `log_softmax` on one short row, the tolerance the model's dtype allows).

    Both paths run the same backbone on the same row, so they can differ only in what happens
    after the last hidden state: the head's rounding (same matmul, other shape) and any logit
    transform. A transform we repeat in `_final_logits` in float32 while the model does it in its
    own dtype rounds each logit a few times at that dtype's epsilon, hence a tolerance of a few
    epsilon × the largest logit; a transform we do not repeat at all is far beyond it."""
    embeddings = model.get_input_embeddings()
    ids = _guard_row(embeddings.num_embeddings, embeddings.weight.device)
    was_training = model.training
    model.eval()  # dropout would make two passes of one row differ
    try:
        with torch.no_grad():
            ours = SequenceScorer(model).position_logps(ids, torch.ones_like(ids, dtype=torch.bool))[0]
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            theirs = logits.log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    finally:
        model.train(was_training)
    eps = torch.finfo(embeddings.weight.dtype).eps
    tolerance = 1e-4 + 4 * eps * float(logits.abs().max())
    return float((ours - theirs).abs().max()), tolerance
