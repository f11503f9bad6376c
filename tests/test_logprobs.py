"""train/logprobs.py (the one sequence log-prob) and train/batching.py (batches and their order)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

import train.logprobs as logprobs
from schemas.shard import TOKEN_IDS_TYPE
from tests.conftest import CORPUS
from train.batching import (
    LengthGroupedSampler,
    TokenColumns,
    collate_pairs,
    processed_tokens,
    token_budget_batches,
)
from train.logprobs import SequenceScorer, sequence_logps
from train.losses import sft_loss


def _columns(prompts, chosens, rejecteds) -> TokenColumns:
    table = pa.table({name: pa.array(rows, TOKEN_IDS_TYPE) for name, rows in
                      (("prompt_input_ids", prompts), ("chosen_input_ids", chosens), ("rejected_input_ids", rejecteds))})
    return TokenColumns.from_table(table)


def _random_columns(n: int, vocab: int, seed: int = 0) -> TokenColumns:
    rng = np.random.default_rng(seed)
    ids = lambda lo, hi: [rng.integers(0, vocab, rng.integers(lo, hi)).tolist() for _ in range(n)]  # noqa: E731
    return _columns(ids(1, 12), ids(1, 9), ids(1, 9))


def _naive_logps(model, batch):
    """Textbook version: full logits of the model's own forward, full log_softmax, shift, mask, sum."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    token = logits[:, :-1].log_softmax(-1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    return (token * batch.completion_mask[:, 1:]).sum(1)


def _tiny(arch: str, vocab: int = 96):
    from transformers import AutoModelForCausalLM, CohereConfig, Gemma2Config, GraniteConfig, LlamaConfig

    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config = {
        "llama": lambda: LlamaConfig(**common),
        # Each of these changes the head's output inside the model's forward, which we bypass.
        "gemma2": lambda: Gemma2Config(**common, head_dim=8, final_logit_softcapping=2.0),
        "cohere": lambda: CohereConfig(**common, logit_scale=3.0),
        "granite": lambda: GraniteConfig(**common, logits_scaling=0.25),
    }[arch]()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


# ---------------------------------------------------------------------------------------------
# sequence_logps


@pytest.mark.parametrize("arch", ["llama", "gemma2", "cohere", "granite"])
def test_equals_full_log_softmax_of_the_models_own_forward(arch):
    model = _tiny(arch)
    columns = _random_columns(5, vocab=96)
    batch = collate_pairs(columns, np.arange(5), pad_id=0)
    with torch.inference_mode():
        got = sequence_logps(model, batch)
        expected = _naive_logps(model, batch)
    assert got.chosen.dtype == torch.float32
    torch.testing.assert_close(torch.cat([got.chosen, got.rejected]), expected, atol=1e-5, rtol=1e-6)
    assert got.chosen_tokens.tolist() == columns.chosen.lengths.tolist()
    assert got.rejected_tokens.tolist() == columns.rejected.lengths.tolist()


def test_chunked_projection_equals_one_chunk(monkeypatch):
    model = _tiny("llama")
    batch = collate_pairs(_random_columns(6, vocab=96, seed=1), np.arange(6), pad_id=0)
    with torch.inference_mode():
        whole = sequence_logps(model, batch)
        monkeypatch.setattr(logprobs, "LOGITS_CHUNK_BYTES", 4 * 96 * 3)  # 3 positions per chunk
        chunked = sequence_logps(model, batch)
    # Same numbers up to float32 summation order (values are ~ -30).
    torch.testing.assert_close(chunked.chosen, whole.chosen, atol=0, rtol=1e-6)
    torch.testing.assert_close(chunked.rejected, whole.rejected, atol=0, rtol=1e-6)


def test_a_row_scores_the_same_alone_and_padded_in_a_batch():
    model = _tiny("llama")
    columns = _random_columns(4, vocab=96, seed=2)
    with torch.inference_mode():
        batched = sequence_logps(model, collate_pairs(columns, np.arange(4), pad_id=7))
        for row in range(4):
            alone = sequence_logps(model, collate_pairs(columns, np.array([row]), pad_id=0))
            assert alone.chosen.item() == pytest.approx(batched.chosen[row].item(), abs=1e-5)
            assert alone.rejected.item() == pytest.approx(batched.rejected[row].item(), abs=1e-5)


def test_gradients_equal_those_of_the_naive_computation(monkeypatch):
    monkeypatch.setattr(logprobs, "LOGITS_CHUNK_BYTES", 4 * 96 * 5)  # several checkpointed chunks
    batch = collate_pairs(_random_columns(3, vocab=96, seed=3), np.arange(3), pad_id=0)
    grads = []
    for compute in (lambda m: (lambda o: torch.cat([o.chosen, o.rejected]))(sequence_logps(m, batch)), lambda m: _naive_logps(m, batch)):
        model = _tiny("llama")
        out = compute(model)
        (out * torch.linspace(-1, 1, len(out))).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_sft_loss_of_the_logps_is_the_token_mean_nll_over_chosen_completions():
    model = _tiny("llama")
    batch = collate_pairs(_random_columns(4, vocab=96, seed=4), np.arange(4), pad_id=0)
    with torch.inference_mode():
        out = sequence_logps(model, batch)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    token = logits[:4, :-1].log_softmax(-1).gather(-1, batch.input_ids[:4, 1:, None]).squeeze(-1)
    expected = -token[batch.completion_mask[:4, 1:]].mean()
    assert sft_loss(out.chosen, out.chosen_tokens).item() == pytest.approx(expected.item(), abs=1e-5)


def test_bfloat16_model_returns_float32_close_to_float32_model():
    columns = _random_columns(4, vocab=96, seed=5)
    batch = collate_pairs(columns, np.arange(4), pad_id=0)
    with torch.inference_mode():
        full = sequence_logps(_tiny("llama"), batch)
        half = sequence_logps(_tiny("llama").to(torch.bfloat16), batch)
    assert half.chosen.dtype == torch.float32
    # ~5 tokens of ≈ -log(96) each; bf16 keeps ~3 significant digits per token.
    torch.testing.assert_close(half.chosen, full.chosen, atol=0.15, rtol=0.01)


def test_a_ddp_style_wrapper_around_the_scorer_is_called_not_bypassed():
    model = _tiny("llama")
    batch = collate_pairs(_random_columns(2, vocab=96, seed=6), np.arange(2), pad_id=0)
    calls = []

    class Wrapper(torch.nn.Module):  # what DDP looks like from outside: `.module` + its own forward
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args):
            calls.append(len(args))
            return self.module(*args)

    with torch.inference_mode():
        wrapped = sequence_logps(Wrapper(SequenceScorer(model)), batch)
        direct = sequence_logps(model, batch)
    assert calls == [2]
    torch.testing.assert_close(wrapped.chosen, direct.chosen)


def trl_precomputed_trainer(model_dir, out_dir, peft_config=None):
    """TRL 1.x `DPOTrainer(precompute_ref_log_probs=True)`, float32 on CPU, over a small
    conversational dataset: its train_dataset holds TRL's own token ids (prompt_ids, chosen_ids,
    rejected_ids) and the reference log-probs TRL computed for them."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = [
        dict(prompt=[{"role": "user", "content": CORPUS[i]}],
             chosen=[{"role": "assistant", "content": CORPUS[i + 1]}],
             rejected=[{"role": "assistant", "content": CORPUS[i + 2][: 10 + 7 * i]}])
        for i in range(6)
    ]
    args = DPOConfig(output_dir=str(out_dir), precompute_ref_log_probs=True, per_device_train_batch_size=4,
                     bf16=False, use_cpu=True, report_to="none")
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args, peft_config=peft_config,
                         train_dataset=Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(model_dir))
    assert len(set(np.round(trainer.train_dataset["ref_rejected_logps"], 2))) == len(rows)  # distinct rows, not one value
    return trainer


def trl_precomputed_dataset(model_dir, out_dir):
    """The train_dataset of `trl_precomputed_trainer`: TRL's token ids and reference log-probs."""
    return trl_precomputed_trainer(model_dir, out_dir).train_dataset


def test_equals_trl_dpo_trainer_precomputed_reference_logps(tiny_model_dir, tmp_path):
    """We score TRL's own token ids with the same model and must match TRL's stored values."""
    from transformers import AutoModelForCausalLM

    data = trl_precomputed_dataset(tiny_model_dir, tmp_path)
    columns = _columns(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.inference_mode():
        got = sequence_logps(model, collate_pairs(columns, np.arange(len(columns)), pad_id=0))
    np.testing.assert_allclose(got.chosen.numpy(), np.array(data["ref_chosen_logps"]), atol=1e-4, rtol=0)
    np.testing.assert_allclose(got.rejected.numpy(), np.array(data["ref_rejected_logps"]), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# batching


def test_collate_lays_out_chosen_rows_then_rejected_rows_right_padded():
    columns = _columns([[1, 2, 3], [7, 8]], [[4, 5], [9]], [[6], [10, 11]])
    batch = collate_pairs(columns, np.array([0, 1]), pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 0, 0], [1, 2, 3, 6, 0], [7, 8, 10, 11, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]
    assert batch.completion_mask.int().tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 1, 1, 0]]
    assert (batch.real_tokens, batch.padded_tokens) == (5 + 3 + 4 + 4, 20)
    assert columns.max_token_id == 11


def test_columns_of_a_sliced_table_index_the_right_rows():
    columns = TokenColumns.from_table(pa.table({
        "prompt_input_ids": pa.array([[1], [2, 2], [3, 3, 3]], TOKEN_IDS_TYPE),
        "chosen_input_ids": pa.array([[4], [5], [6]], TOKEN_IDS_TYPE),
        "rejected_input_ids": pa.array([[7], [8], [9]], TOKEN_IDS_TYPE),
    }).slice(1))
    assert len(columns) == 2
    assert columns.prompt.row(1).tolist() == [3, 3, 3]
    assert columns.pair_lengths.tolist() == [3, 4]


def test_token_budget_batches_cover_every_row_once_longest_first_within_budget():
    lengths = np.array([5, 40, 12, 12, 3, 100, 7, 30])
    batches = token_budget_batches(lengths, batch_tokens=120)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    assert batches[0].tolist() == [5]  # 2 × 100 > 120: alone, not dropped
    for b in batches[1:]:
        assert 2 * len(b) * lengths[b].max() <= 120
    widths = [int(lengths[b].max()) for b in batches]
    assert widths == sorted(widths, reverse=True)
    assert [b.tolist() for b in batches] == [[5], [1], [7, 2], [3, 6, 0, 4]]
    assert processed_tokens(lengths, batches) == 2 * (100 + 40 + 2 * 30 + 4 * 12)


def test_length_grouped_sampler_is_a_seeded_permutation_grouped_by_length():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 500, 1000)
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=3, window_batches=16)
    epoch0 = sampler.epoch_batches(0)
    assert len(epoch0) == len(sampler) == 125
    assert sorted(np.concatenate(epoch0).tolist()) == list(range(1000))
    again = LengthGroupedSampler(lengths, 8, seed=3, window_batches=16).epoch_batches(0)
    assert [b.tolist() for b in epoch0] == [b.tolist() for b in again]
    assert [b.tolist() for b in epoch0] != [b.tolist() for b in sampler.epoch_batches(1)]
    # Sorted within windows: batches are far more length-homogeneous than random ones.
    spread = np.mean([np.ptp(lengths[b]) for b in epoch0])
    random_spread = np.mean([np.ptp(lengths[b]) for b in np.split(rng.permutation(1000), 125)])
    assert spread < random_spread / 5


def test_length_grouped_sampler_resumes_exactly_from_a_position():
    sampler = LengthGroupedSampler(np.arange(1, 21), batch_size=3, seed=0, window_batches=2)
    steps = sampler.steps_from(0, 0, accumulation=2)
    uninterrupted = [next(steps) for _ in range(12)]  # crosses two epoch boundaries (7 batches: 4 steps each)
    _, position, _ = uninterrupted[5]
    resumed = sampler.steps_from(*position, accumulation=2)
    tail = [next(resumed) for _ in range(6)]
    as_lists = lambda steps: [(e, p, [b.tolist() for b in batches]) for e, p, batches in steps]  # noqa: E731
    assert as_lists(tail) == as_lists(uninterrupted[6:])
    assert position == (1, 4) and [e for e, _, _ in uninterrupted] == [0] * 4 + [1] * 4 + [2] * 4


def test_each_epoch_uses_every_pair_once_whatever_the_accumulation():
    """An epoch's last step holds the batches left over, never the next epoch's."""
    sampler = LengthGroupedSampler(np.arange(1, 14), batch_size=6, seed=0)  # 13 pairs: batches of 6, 6, 1
    steps = sampler.steps_from(0, 0, accumulation=2)
    for epoch in range(2):
        (first_epoch, _, first), (second_epoch, after, second) = next(steps), next(steps)
        assert first_epoch == second_epoch == epoch and after == (epoch + 1, 0)
        assert len(first) == 2 and len(second) == 1
        assert sorted(np.concatenate(first + second).tolist()) == list(range(13))
    assert sampler.steps_per_epoch(2) == 2
