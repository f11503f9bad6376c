"""Prefix sharing: one row [prompt, chosen, rejected] per pair gives the padded layout's log-probs
and gradients (float32, within 1e-5) on every tiny architecture, and the stages accept either."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from tests.test_logprobs import _columns, _random_columns
from tests.test_train import shards  # noqa: F401  (a fixture)
from train.batching import collate_pairs
from train.layouts import prefix_sharing_exact
from train.logprobs import sequence_logps
from train.masks import allowed_positions, shared_attention_mask


def _tiny(arch: str, vocab: int = 96, attn: str = "sdpa", max_positions: int = 128):
    from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions)
    config = {
        "llama": lambda: LlamaConfig(**common),
        "qwen2": lambda: Qwen2Config(**common),
        # logit and attention soft-capping; its sliding window (set below the default) is wider than every pair here
        "gemma2": lambda: Gemma2Config(**common, head_dim=8, final_logit_softcapping=2.0, attn_logit_softcapping=5.0,
                                       sliding_window=64),
    }[arch]()
    config._attn_implementation = attn
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _both(model, columns, rows, packed=False):
    plain = sequence_logps(model, collate_pairs(columns, rows, pad_id=0))
    shared = sequence_logps(model, collate_pairs(columns, rows, pad_id=0, shared=True, packed=packed))
    return plain, shared


# Gemma 2 runs eager attention only (its attention soft-capping).
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize(("arch", "attn"), [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"), ("gemma2", "eager")])
def test_shared_logps_equal_the_padded_layout(arch, attn, packed):
    model = _tiny(arch, attn=attn)
    columns = _random_columns(7, vocab=96, seed=11)  # prompts 1–11 tokens, answers 1–8: uneven padding both ways
    assert prefix_sharing_exact(model, columns.pair_lengths)
    if packed:
        assert len(collate_pairs(columns, np.arange(7), pad_id=0, shared=True, packed=True).input_ids) == 1
    with torch.inference_mode():
        plain, shared = _both(model, columns, np.arange(7), packed)
    torch.testing.assert_close(shared.chosen, plain.chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared.rejected, plain.rejected, atol=1e-5, rtol=0)
    assert shared.chosen_tokens.tolist() == plain.chosen_tokens.tolist() == columns.chosen.lengths.tolist()
    assert shared.rejected_tokens.tolist() == plain.rejected_tokens.tolist() == columns.rejected.lengths.tolist()


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_shared_gradients_equal_the_padded_layout(arch, packed):
    columns = _random_columns(5, vocab=96, seed=12)
    grads = []
    for shared in (False, True):
        model = _tiny(arch, attn="eager" if arch == "gemma2" else "sdpa")
        out = sequence_logps(model, collate_pairs(columns, np.arange(5), pad_id=0, shared=shared, packed=packed and shared))
        (torch.cat([out.chosen, out.rejected]) * torch.linspace(-1, 1, 10)).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


def test_rejected_never_sees_chosen_and_answers_of_one_token_work():
    """Same prompt and rejected answer, two different chosen answers: the rejected log-prob must
    not change. Truncated-style pairs (one-token answers) too."""
    model = _tiny("llama")
    columns = _columns([[5, 6, 7], [5, 6, 7], [9]], [[10, 11, 12, 13], [40, 41], [3]], [[20, 21], [20, 21], [4]])
    with torch.inference_mode():
        plain, shared = _both(model, columns, np.arange(3))
    assert shared.rejected[0].item() == pytest.approx(shared.rejected[1].item(), abs=1e-6)
    assert abs(shared.chosen[0].item() - shared.chosen[1].item()) > 1e-3
    torch.testing.assert_close(shared.chosen, plain.chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared.rejected, plain.rejected, atol=1e-5, rtol=0)


def test_not_exact_where_the_kernel_takes_no_mask_or_a_window_cuts_a_pair():
    columns = _random_columns(4, vocab=96, seed=13)
    long_pairs = np.array([10, 200])
    assert not prefix_sharing_exact(_tiny("gemma2", attn="eager"), long_pairs)  # 200 > its 64-token window
    model = _tiny("llama")
    model.config._attn_implementation = "flash_attention_2"
    assert not prefix_sharing_exact(model, columns.pair_lengths)


@pytest.mark.parametrize("packed", [False, True])
def test_flex_block_mask_allows_exactly_what_the_dense_mask_allows(packed):
    from torch.nn.attention.flex_attention import create_mask

    columns = _random_columns(6, vocab=96, seed=14)
    layout = collate_pairs(columns, np.arange(6), pad_id=0, shared=True, packed=packed, bucketed=True).shared
    dense = allowed_positions(layout.segments, layout.pair)
    block = shared_attention_mask(layout.segments, layout.pair, "flex_attention", torch.float32)
    rows, length = layout.segments.shape
    assert torch.equal(create_mask(block.mask_mod, rows, 1, length, length, device="cpu"), dense)
    unbucketed = collate_pairs(columns, np.arange(6), pad_id=0, shared=True, packed=packed).shared
    with pytest.raises(RuntimeError, match="whole 128-token tiles"):  # what torch's kernel scores wrongly
        shared_attention_mask(unbucketed.segments, unbucketed.pair, "flex_attention", torch.float32)


def test_flex_block_mask_skips_the_tiles_of_other_pairs():
    """A packed row of 8 pairs of 128 tokens: causal attention over the row touches 36 of its 8 × 8
    tiles of 128, the pairs' own blocks only 8: FlexAttention computes 8."""
    columns = _columns([[1] * 64] * 8, [[2] * 32] * 8, [[3] * 32] * 8)
    layout = collate_pairs(columns, np.arange(8), pad_id=0, shared=True, packed=True).shared
    block = shared_attention_mask(layout.segments, layout.pair, "flex_attention", torch.float32)
    computed = int(block.kv_num_blocks.sum()) + int(block.full_kv_num_blocks.sum())
    assert layout.segments.shape == (1, 1024) and computed == 8


def _long_columns(n: int, seed: int):
    """Pairs of 30–700 tokens: packed, they cross FlexAttention's 128-token tiles at odd places, and
    the longer ones hold whole tiles of prompt, of chosen and of rejected tokens."""
    rng = np.random.default_rng(seed)
    ids = lambda lo, hi: [rng.integers(0, 96, rng.integers(lo, hi)).tolist() for _ in range(n)]  # noqa: E731
    return _columns(ids(10, 300), ids(10, 200), ids(10, 200))


@pytest.mark.parametrize("packed", [False, True])
def test_flex_tiles_cover_every_allowed_position_and_full_tiles_need_no_rule(packed):
    from train.batching import FLEX_TILE

    columns = _long_columns(10, seed=15)
    layout = collate_pairs(columns, np.arange(10), pad_id=0, shared=True, packed=packed, bucketed=True).shared
    dense = allowed_positions(layout.segments, layout.pair)[:, 0]
    block = shared_attention_mask(layout.segments, layout.pair, "flex_attention", torch.float32)
    rows, length = layout.segments.shape
    tiles = -(-length // FLEX_TILE)
    padded = torch.zeros(rows, tiles * FLEX_TILE, tiles * FLEX_TILE, dtype=torch.bool)
    padded[:, :length, :length] = dense
    per_tile = padded.view(rows, tiles, FLEX_TILE, tiles, FLEX_TILE).transpose(2, 3)
    any_allowed, all_allowed = per_tile.any(-1).any(-1), per_tile.all(-1).all(-1)

    def listed(count, index):
        marked = torch.zeros(rows, tiles, tiles, dtype=torch.bool)
        for row in range(rows):
            for q_tile in range(tiles):
                marked[row, q_tile, index[row, 0, q_tile, : count[row, 0, q_tile]].long()] = True
        return marked

    partial = listed(block.kv_num_blocks, block.kv_indices)
    full = listed(block.full_kv_num_blocks, block.full_kv_indices)
    assert tiles >= 4 if packed else True
    assert not (partial & full).any()
    assert torch.equal(any_allowed & ~(partial | full), torch.zeros_like(any_allowed))  # nothing allowed is skipped
    assert torch.equal(full & ~all_allowed, torch.zeros_like(full))  # a full tile really is all allowed
    assert full.any() if packed else True
    assert (partial | full).sum() < torch.ones(tiles, tiles).tril().sum() * rows  # and tiles are skipped


def test_flex_attention_scores_prefix_shared_and_packed_rows_like_the_padded_layout():
    """The CUDA path's kernel, run here through the model's own FlexAttention (compiled forward; CPU
    has no FlexAttention backward): same log-probs as SDPA on the padded layout, on the rows the
    trainer builds for it (bucketed: whole tiles; unbucketed widths are scored wrongly from call to
    call by torch 2.13's kernel, `packed_width`). Each shape compiles statically: torch 2.13's CPU
    build of a dynamic-shape FlexAttention kernel fails. Each layout is scored three times: a
    kernel reading memory it does not own gives different numbers from call to call."""
    sdpa, flex = _tiny("llama", max_positions=1024), _tiny("llama", attn="flex_attention", max_positions=1024)
    with torch.inference_mode(), torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        # short pairs (one tile per row), and long ones (a packed row of ~30 tiles) whose sums of
        # hundreds of nats are compared within 1e-6 relative: a few float32 ulps
        for columns, rtol in ((_random_columns(7, vocab=96, seed=11), 0.0), (_long_columns(10, seed=16), 1e-6)):
            assert prefix_sharing_exact(flex, columns.pair_lengths)
            rows = np.arange(len(columns))
            plain = sequence_logps(sdpa, collate_pairs(columns, rows, pad_id=0))
            for packed, _ in itertools.product((False, True), range(3)):
                shared = sequence_logps(flex, collate_pairs(columns, rows, pad_id=0, shared=True, packed=packed, bucketed=True))
                torch.testing.assert_close(shared.chosen, plain.chosen, atol=1e-5, rtol=rtol)
                torch.testing.assert_close(shared.rejected, plain.rejected, atol=1e-5, rtol=rtol)


def test_packed_rows_for_a_compiled_kernel_meet_few_widths_and_score_the_same():
    """FlexAttention's kernel is compiled per shape: packed rows (a new length every batch) are
    padded to `packed_width`, a few widths per doubling, and the padding changes no log-prob."""
    from train.batching import FLEX_TILE, packed_width

    widths = np.array([packed_width(tokens) for tokens in range(1, 16_385)])
    assert (widths >= np.arange(1, 16_385)).all() and (widths % FLEX_TILE == 0).all()
    assert len(set(widths.tolist())) == 8 + 4 * 4  # 8 tiles one by one, then 4 widths per doubling to 128 tiles
    long_rows = np.arange(8 * FLEX_TILE + 1, 16_385)
    assert ((widths[long_rows - 1] - long_rows) / long_rows).max() <= 1 / 4
    model = _tiny("llama", max_positions=1024)
    columns = _long_columns(10, seed=16)
    rows = np.arange(len(columns))
    bucketed = collate_pairs(columns, rows, pad_id=0, shared=True, packed=True, bucketed=True)
    exact = collate_pairs(columns, rows, pad_id=0, shared=True, packed=True)
    assert bucketed.input_ids.shape[1] == packed_width(exact.input_ids.shape[1]) > exact.input_ids.shape[1]
    with torch.inference_mode():
        torch.testing.assert_close(sequence_logps(model, bucketed).chosen, sequence_logps(model, exact).chosen, atol=1e-5, rtol=1e-6)


def test_packing_runs_flex_attention_on_cuda_only():
    from schemas.errors import UserError
    from train.models import attention_kernel

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert attention_kernel(None, True, cuda) == "flex_attention"
    assert attention_kernel(None, False, cuda) is None and attention_kernel(None, True, cpu) is None
    assert attention_kernel("eager", True, cuda) == "eager"
    with pytest.raises(UserError, match="flex_attention runs on CUDA only"):
        attention_kernel("flex_attention", False, cpu)


def test_packing_puts_a_batch_in_one_row_with_positions_from_zero_per_pair():
    columns = _columns([[1, 2, 3, 4], [5], [11]], [[6, 7], [8], [12]], [[9], [10], [13]])  # 7, 3 and 3 tokens
    batch = collate_pairs(columns, np.arange(3), pad_id=0, shared=True, packed=True)
    assert batch.input_ids.shape == (1, 13) and batch.padded_tokens == batch.computed_tokens == 13
    assert batch.shared.pair[0].tolist() == [0] * 7 + [1] * 3 + [2] * 3
    # each pair from 0; its rejected answer restarts after its prompt
    assert batch.shared.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 4, 0, 1, 1, 0, 1, 1]


def test_batch_counts_the_prompt_twice_but_computes_it_once():
    columns = _columns([[1, 2, 3]], [[4, 5]], [[6]])
    plain = collate_pairs(columns, np.arange(1), pad_id=0)
    shared = collate_pairs(columns, np.arange(1), pad_id=0, shared=True)
    assert plain.real_tokens == shared.real_tokens == 2 * 3 + 2 + 1
    assert shared.computed_tokens == 6 and plain.computed_tokens == 9
    assert shared.shared.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3]


# ---------------------------------------------------------------------------------------------
# The stages: precompute-ref and train with prefix sharing on (the default) and off


def test_shards_scored_shared_equal_shards_scored_padded_and_train_accepts_either(shards, tiny_model_dir, tmp_path):  # noqa: F811
    import shutil

    from schemas.manifest import Manifest
    from tests.test_multiprocess import _ref_columns
    from tests.test_train import _config, _metrics
    from train.loop import train
    from train.reference import PrecomputeRefConfig, precompute_ref

    padded = tmp_path / "padded"
    shutil.copytree(shards.parent / "unscored", padded)
    precompute_ref(PrecomputeRefConfig(shards=str(padded), model=str(tiny_model_dir), prefix_sharing="off"))
    assert Manifest.read(shards).stats["prefix_shared_shards"] == len(Manifest.read(shards).shards)  # the default shares
    assert Manifest.read(padded).stats["prefix_shared_shards"] == 0
    # Sums near 100 nats: float32's spacing there is 7.6e-6, so two layouts' sums differ by a few of it.
    for name, values in _ref_columns(shards).items():
        np.testing.assert_allclose(_ref_columns(padded)[name], values, atol=1e-5, rtol=1e-6)

    # Trained either way on shards scored the other way: the step-0 check passes, the losses agree.
    # Each layout groups pairs into batches by its own row length, so a step holds the whole split
    # (64 pairs) for both runs to train on the same pairs at every step.
    train(_config(padded, tiny_model_dir, tmp_path / "on", max_steps=3, log_every=1, batch_size=64))
    train(_config(shards, tiny_model_dir, tmp_path / "off", max_steps=3, log_every=1, batch_size=64, prefix_sharing="off"))
    on, off = ([m for m in _metrics(tmp_path / run) if "loss" in m] for run in ("on", "off"))
    assert [m["prefix_sharing"] for m in on + off] == [True] * len(on) + [False] * len(off)
    assert [m["loss"] for m in on] == pytest.approx([m["loss"] for m in off], abs=1e-5)
    assert [m["tokens"] for m in on] == [m["tokens"] for m in off]  # the prompt counted twice either way


def test_packed_stages_equal_unpacked_ones_and_packing_without_sharing_is_refused(shards, tiny_model_dir, tmp_path):  # noqa: F811
    import shutil

    from schemas.errors import UserError
    from tests.test_multiprocess import _ref_columns
    from tests.test_train import _config, _metrics
    from train.loop import train
    from train.reference import PrecomputeRefConfig, precompute_ref

    packed = tmp_path / "packed"
    shutil.copytree(shards.parent / "unscored", packed)
    precompute_ref(PrecomputeRefConfig(shards=str(packed), model=str(tiny_model_dir), packing=True))
    for name, values in _ref_columns(shards).items():
        # sums of ~100 nats: 1e-5 is two float32 ulps there, hence the relative term
        np.testing.assert_allclose(_ref_columns(packed)[name], values, atol=1e-5, rtol=1e-6)

    train(_config(shards, tiny_model_dir, tmp_path / "plain", max_steps=3, log_every=1))
    train(_config(shards, tiny_model_dir, tmp_path / "pack", max_steps=3, log_every=1, packing=True))
    plain, pack = ([m for m in _metrics(tmp_path / run) if "loss" in m] for run in ("plain", "pack"))
    assert [m["loss"] for m in pack] == pytest.approx([m["loss"] for m in plain], abs=1e-5)
    assert all(m["packing"] for m in pack)
    assert sum(m["padding_efficiency"] for m in pack) > sum(m["padding_efficiency"] for m in plain)
    with pytest.raises(UserError, match="--packing needs the prefix-shared layout"):
        train(_config(shards, tiny_model_dir, tmp_path / "r", max_steps=1, packing=True, prefix_sharing="off"))


@pytest.mark.parametrize(("shared", "packed"), [(False, False), (True, False), (True, True)])
def test_flexattention_rows_are_whole_tiles_and_the_budget_counts_them(shared, packed):
    """What the trainer and precompute-ref build for FlexAttention (bucketed): rows of whole tiles
    in every layout (torch's kernel scores other widths wrongly, `packed_width`), KTO's batch of
    second continuations too; and the token budget counts the widths the rows are built at, so a
    batch never holds more tokens than --batch-tokens (unless one pair alone does)."""
    from train.batching import FLEX_TILE, Collator, token_budget_batches

    columns = _random_columns(23, vocab=96, seed=3)
    for collate in (Collator(0, shared, packed, bucketed=True), Collator(0, shared, packed, bucketed=True, second_apart=True)):
        lengths, rows_per_pair = collate.batch_lengths(columns)
        batches = token_budget_batches(lengths, 4 * FLEX_TILE, rows_per_pair)
        assert len(batches) > 1
        for rows in batches:
            batch = collate(columns, rows)
            for built in (batch, batch.apart) if batch.apart is not None else (batch,):
                assert built.input_ids.shape[1] % FLEX_TILE == 0
            if not packed:
                assert batch.input_ids.numel() <= max(4 * FLEX_TILE, rows_per_pair * int(lengths[rows].max()))
        if not collate.second_apart:  # the manifest's processed tokens: what the built batches hold
            built = sum(collate(columns, rows).input_ids.numel() for rows in batches)
            assert collate.processed_tokens(lengths, batches, rows_per_pair) == built
