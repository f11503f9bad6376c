"""Train mode is a decision (dropout off by default, every scoring pass without it) and the step-0
check of the stored reference scales with the answers' length and dtype."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from prefdata.tokenize import TokenizeConfig, tokenize
from schemas.errors import UserError
from tests.records_factory import make_record, write_records_dir
from tests.test_train import _config, _edit_ref, _metrics, shards  # noqa: F401  (shards is a fixture)
from train.loop import train
from train.reference import PrecomputeRefConfig, precompute_ref


def _with_config(model_dir: Path, out: Path, **changes: object) -> Path:
    """The same weights, saved with `changes` made to the config (dropout rates)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, **changes)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def _first_losses(out: Path) -> list[float]:
    return [m["loss"] for m in _metrics(out) if "loss" in m]


def test_dropout_is_off_by_default_and_the_reference_check_scores_without_it(shards, tiny_model_dir, tmp_path):  # noqa: F811
    """A model with attention dropout 0.1 whose reference was stored without it (precompute-ref
    scores in eval mode). Step 1's policy equals the reference, so its loss is log 2 exactly —
    unless dropout makes the policy's log-probs noisy, which --no-disable-dropout asks for."""
    dropout_model = _with_config(tiny_model_dir, tmp_path / "dropout-model", attention_dropout=0.1)
    scored = tmp_path / "shards"
    shutil.copytree(shards.parent / "unscored", scored)
    precompute_ref(PrecomputeRefConfig(shards=str(scored), model=str(dropout_model)))
    np.testing.assert_allclose(  # the stored values are the dropout-free model's: the same as the original's
        pa.ipc.open_file(scored / "train-00000.arrow").read_all().column("ref_chosen_logps").to_numpy(),
        pa.ipc.open_file(shards / "train-00000.arrow").read_all().column("ref_chosen_logps").to_numpy(), atol=1e-5)

    off = tmp_path / "off"
    train(_config(scored, dropout_model, off, max_steps=2, log_every=1, check_reference_rows=16))
    assert _first_losses(off)[0] == pytest.approx(np.log(2), abs=1e-6)
    kept = tmp_path / "kept"
    # The step-0 check passes here too: it scores in eval mode whatever the training forward does.
    train(_config(scored, dropout_model, kept, max_steps=2, log_every=1, check_reference_rows=16, disable_dropout=False))
    assert abs(_first_losses(kept)[0] - np.log(2)) > 1e-3


@pytest.fixture(scope="module")
def long_answers(tiny_model_dir, tmp_path_factory) -> Path:
    """Pairs whose answers run to ~500 tokens, tokenized (unscored)."""
    root = tmp_path_factory.mktemp("long")
    words = "warm funny delight dull wooden waste capital Paris hash table autumn leaves".split()
    rng = np.random.default_rng(0)
    answer = lambda: " ".join(rng.choice(words, size=480))  # noqa: E731
    write_records_dir(root / "records", {"train": [make_record(f"Review {i}.", answer(), answer(), row=i) for i in range(4)], "eval": []})
    tokenize(TokenizeConfig(input_dir=str(root / "records"), tokenizer=str(tiny_model_dir), out=str(root / "unscored")))
    return root / "unscored"


def _answer_tokens(shards_dir: Path) -> np.ndarray:
    table = pa.ipc.open_file(shards_dir / "train-00000.arrow").read_all()
    return np.array([len(ids) for ids in table.column("chosen_input_ids").to_pylist()])


@pytest.mark.parametrize(("stored", "policy"), [("bfloat16", "float32"), ("float32", "bfloat16"), ("float32", "float32")])
def test_step0_check_admits_rounding_and_refuses_a_small_shift_per_token_on_long_answers(long_answers, tiny_model_dir,
                                                                                         tmp_path, stored, policy):
    tokens = _answer_tokens(long_answers)
    assert tokens.min() >= 400
    scored = tmp_path / "scored"
    shutil.copytree(long_answers, scored)
    precompute_ref(PrecomputeRefConfig(shards=str(scored), model=str(tiny_model_dir), dtype=stored))
    train(_config(scored, tiny_model_dir, tmp_path / "right", max_steps=1, dtype=policy))  # the right model passes
    # Another model's values differ on every token: 0.05 nats each is ~25 nats per answer here.
    shifted = _edit_ref(scored, tmp_path / "shifted", slice(None), lambda values: values - 0.05 * tokens)
    with pytest.raises(UserError, match=r"stale.*|nats over \d+ tokens"):
        train(_config(shifted, tiny_model_dir, tmp_path / "wrong", max_steps=1, dtype=policy))


def test_step0_check_tolerance_grows_slower_than_a_shift_on_every_token():
    from train.reference import reference_check_tolerance

    allowed = reference_check_tolerance(torch.bfloat16, np.array([1, 100, 500, 4000]))
    assert allowed[0] < allowed[1] < allowed[2] < allowed[3]
    shift = 0.05 * np.array([1, 100, 500, 4000])  # another model's values: off on every token
    assert (allowed[2:] < shift[2:] * 0.6).all()  # refused with room on long answers, where rounding adds up most
    assert allowed[2] == pytest.approx(0.5 + 0.35 * np.sqrt(500) + 0.01 * 500)
    assert reference_check_tolerance(torch.float32, np.array([500]))[0] < 0.05


@pytest.mark.parametrize("architecture", ["llama", "gpt2", "falcon", "opt"])
def test_disable_dropout_reaches_modules_attributes_and_configs(architecture):
    """Llama keeps its attention rate as an attribute, GPT-2 and OPT in dropout modules (OPT also a
    layerdrop), Falcon reads its rates from the config at call time: two training-mode forwards
    differ before and agree after."""
    from transformers import AutoModelForCausalLM, FalconConfig, GPT2Config, LlamaConfig, OPTConfig

    config = {
        "llama": lambda: LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, attention_dropout=0.3),
        "gpt2": lambda: GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3),
        "falcon": lambda: FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       hidden_dropout=0.3, attention_dropout=0.3),
        "opt": lambda: OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                 word_embed_proj_dim=32, dropout=0.3, attention_dropout=0.3, layerdrop=0.3),
    }[architecture]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).train()
    ids = torch.randint(0, 64, (2, 12))
    assert not torch.equal(model(ids).logits, model(ids).logits)
    from train.models import disable_dropout

    disable_dropout(model)
    assert torch.equal(model(ids).logits, model(ids).logits)
