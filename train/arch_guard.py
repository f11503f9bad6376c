"""The architecture guard: train/logprobs.py skips the model's own `forward` (it projects only
the scored positions) and repeats the logit transforms it knows in `_final_logits`; this catches
the rest. `forward_disagreement` scores one short row both ways; `train.models.load_causal_lm`
refuses a model whose two answers differ by more than its dtype allows
(`check_scoring_matches_forward`)."""

from __future__ import annotations

import torch

from train.logprobs import SequenceScorer

GUARD_TOKENS = 16


def guard_row(vocab_size: int, device: torch.device) -> torch.Tensor:
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
    ids = guard_row(embeddings.num_embeddings, embeddings.weight.device)
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
