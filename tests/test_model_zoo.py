"""A model zoo (issue 23, item 4): a tiny model of every architecture the guard admits, GPT-2
(learned absolute positions, dropout, no pad token, tied embeddings) and Mistral with a sliding
window, each through tokenize → precompute-ref → train (unshared, prefix-shared, packed) →
generate → eval, in-process. Where a layout cannot be exact (a window shorter than a pair), the
run says so in one line naming the architecture instead."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    CohereConfig,
    Gemma2Config,
    GemmaConfig,
    GPT2Config,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

from prefdata.tokenize import TokenizeConfig, tokenize
from schemas.errors import UserError
from tests.records_factory import write_records_dir
from tests.test_arch_guard import _save
from tests.test_train import _learnable
from train.batching import Collator
from train.config import TrainConfig
from train.data import open_shards
from train.eval import EvalConfig, evaluate_policy
from train.generate import GENERATIONS_FILE, GenerateConfig, generate
from train.layouts import prefix_sharing_exact
from train.logprobs import sequence_logps
from train.loop import train
from train.models import load_causal_lm, padding_id
from train.reference import PrecomputeRefConfig, precompute_ref

CPU = torch.device("cpu")
TRAIN_PAIRS, EVAL_PAIRS = 8, 4
# initializer_range 0.2, not 0.02: at the default scale a tiny random model barely attends by
# position, and a wrong position id moves a log-prob by less than the 1e-4 the layouts must meet.
INIT = dict(initializer_range=0.2)
COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, **INIT)


@dataclass(frozen=True)
class Architecture:
    config: Callable[[], object]
    tokenizer: str  # "chat": ChatML with a pad token; "base_no_pad": no template, no pad token (GPT-2's)
    # None where prefix sharing (and so packing) is exact on these pairs; else what --packing's
    # one-line refusal must say: the architecture and why
    packing_refusal: str | None = None


ARCHITECTURES = {
    "llama": Architecture(lambda: LlamaConfig(**COMMON), "chat"),
    "qwen2": Architecture(lambda: Qwen2Config(**COMMON), "chat"),
    # Gemma scales its embeddings by √hidden; Gemma 2 soft-caps attention scores and logits and
    # alternates sliding (here wider than any pair) and full layers.
    "gemma": Architecture(lambda: GemmaConfig(**COMMON, head_dim=8), "chat"),
    "gemma2": Architecture(lambda: Gemma2Config(**COMMON, head_dim=8, final_logit_softcapping=2.0,
                                                attn_logit_softcapping=5.0, sliding_window=64), "chat"),
    "cohere": Architecture(lambda: CohereConfig(**COMMON, logit_scale=3.0), "chat"),
    "granite": Architecture(lambda: GraniteConfig(**COMMON, logits_scaling=0.25), "chat"),
    # A window wider than every pair but narrower than a packed row (8 pairs of ~30 tokens): the
    # shared mask replaces the window, which must then cut nothing.
    "mistral-window-64": Architecture(lambda: MistralConfig(**COMMON, sliding_window=64), "chat"),
    # A window shorter than every pair: only the padded layout is exact.
    "mistral-window-8": Architecture(lambda: MistralConfig(**COMMON, sliding_window=8), "chat",
                                     "mistral (MistralForCausalLM) cannot use in this run (a pair of"),
    # Learned absolute positions (position ids must restart exactly), dropout 0.1 everywhere,
    # tied embeddings, and a tokenizer without a pad token.
    "gpt2": Architecture(lambda: GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **INIT),
                         "base_no_pad"),
}
LAYOUTS = {"unshared": dict(prefix_sharing="off"), "shared": dict(prefix_sharing="auto"), "packed": dict(packing=True)}


@dataclass(frozen=True)
class Pipeline:
    name: str
    architecture: Architecture
    model: Path
    records: Path
    shards: Path


@pytest.fixture(scope="module")
def base_no_pad_tokenizer_dir(base_tokenizer_dir, tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_tokenizer_dir)
    tokenizer.pad_token = None
    out = tmp_path_factory.mktemp("base-no-pad-tok")
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def pipeline(request, chat_tokenizer_dir, base_no_pad_tokenizer_dir, tmp_path_factory) -> Pipeline:
    """A tiny model of one architecture, its records tokenized and scored by it."""
    name, arch = request.param, ARCHITECTURES[request.param]
    root = tmp_path_factory.mktemp(name)
    tokenizer_dir = {"chat": chat_tokenizer_dir, "base_no_pad": base_no_pad_tokenizer_dir}[arch.tokenizer]
    model = _save(arch.config(), tokenizer_dir, root / "model")
    records = write_records_dir(root / "records", {"train": _learnable(TRAIN_PAIRS),
                                                   "eval": _learnable(EVAL_PAIRS, offset=1000)})
    tokenize(TokenizeConfig(input_dir=str(records), tokenizer=str(model), out=str(root / "shards"), workers=1))
    precompute_ref(PrecomputeRefConfig(shards=str(root / "shards"), model=str(model), device="cpu"))
    return Pipeline(name, arch, model, records, root / "shards")


def _train_config(p: Pipeline, out: Path, **layout) -> TrainConfig:
    # One batch holds every pair, so each step's loss is over the same pairs and must fall.
    return TrainConfig(shards=str(p.shards), model=str(p.model), out=str(out), device="cpu", batch_size=TRAIN_PAIRS,
                       learning_rate=1e-2, beta=0.5, max_steps=3, log_every=1, lr_schedule="constant", **layout)


def test_shared_and_packed_logps_equal_unshared_ones_where_sharing_is_exact(pipeline):
    model, tokenizer = load_causal_lm(pipeline.model, pipeline.name, torch.float32, CPU)
    _, data, _ = open_shards(pipeline.shards, need_ref=True)
    exact = prefix_sharing_exact(model, data.columns.pair_lengths)
    assert exact is (pipeline.architecture.packing_refusal is None)
    if not exact:
        return
    rows = np.arange(len(data))
    pad_id = padding_id(tokenizer)
    model.eval()
    with torch.inference_mode():
        unshared, shared, packed = (sequence_logps(model, Collator(pad_id, shared=shared, packed=packed)(data.columns, rows))
                                    for shared, packed in ((False, False), (True, False), (True, True)))
    for layout in (shared, packed):
        torch.testing.assert_close(layout.chosen, unshared.chosen, atol=1e-4, rtol=0)
        torch.testing.assert_close(layout.rejected, unshared.rejected, atol=1e-4, rtol=0)
    # and the stored reference (precompute-ref's default, prefix-shared where exact) is the same numbers
    torch.testing.assert_close(unshared.chosen.numpy(), data.ref_logps(rows)[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_training_starts_at_log_2_and_lowers_the_loss(pipeline, layout, tmp_path):
    config = _train_config(pipeline, tmp_path / "run", **LAYOUTS[layout])
    refusal = pipeline.architecture.packing_refusal
    if layout == "packed" and refusal is not None:
        with pytest.raises(UserError) as refused:
            train(config)
        assert refusal in str(refused.value) and "\n" not in str(refused.value)
        return
    train(config)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in logged if "loss" in m]
    assert losses[0] == pytest.approx(np.log(2), abs=1e-5)  # policy == reference, dropout off
    assert losses[-1] < losses[0] - 1e-3
    sharing = layout != "unshared" and refusal is None
    assert all(m["prefix_sharing"] is sharing for m in logged if "loss" in m)


def test_generate_ends_answers_at_a_stop_token_or_the_length_limit(pipeline, tmp_path):
    max_new_tokens, n = 24, 3
    generate(GenerateConfig(prompts=str(pipeline.records), policy=str(pipeline.model), out=str(tmp_path / "gen"), n=n,
                            max_new_tokens=max_new_tokens, split="eval", device="cpu", dtype="float32"))
    lines = [json.loads(line) for line in (tmp_path / "gen" / GENERATIONS_FILE).read_text().splitlines()]
    assert len(lines) == EVAL_PAIRS and all(len(line["responses"]) == n for line in lines)
    for response in (r for line in lines for r in line["responses"]):
        # cut right after its first stop token, or not stopped and exactly at the limit
        assert response["finish_reason"] in ("stop", "length") and 0 < response["tokens"] <= max_new_tokens
        assert response["finish_reason"] == "stop" or response["tokens"] == max_new_tokens


def test_eval_finds_no_kl_between_a_model_and_itself(pipeline, tmp_path):
    result = evaluate_policy(EvalConfig(shards=str(pipeline.shards), policy=str(pipeline.model),
                                        reference=str(pipeline.model), out=str(tmp_path / "eval"), samples=2,
                                        max_new_tokens=8, device="cpu"))
    assert result["kl"] == pytest.approx(0.0, abs=1e-6)
    assert result["margin"] == pytest.approx(0.0, abs=1e-4) and result["accuracy"] == 0.0  # every pair a tie
    assert result["samples"] == 2 * EVAL_PAIRS
