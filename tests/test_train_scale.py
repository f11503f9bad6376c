"""The trainer at model scale, on tiny models: a bf16 reference, and LoRA adapters and their
checkpoints (FSDP2 and LoRA on several processes: tests/test_multiprocess.py, tests/test_resume.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from schemas.errors import UserError
from tests.test_train import _config, _edit_ref, _metrics, shards  # noqa: F401  (shards is a fixture)
from train.loop import train
from train.reference import PrecomputeRefConfig, precompute_ref

pytest.importorskip("peft")


def _losses(out: Path) -> list[float]:
    return [m["loss"] for m in _metrics(out) if "loss" in m]


@pytest.fixture(scope="module")
def bf16_shards(shards, tmp_path_factory) -> Path:  # noqa: F811
    """The same rows with the reference scored in bfloat16, as precompute-ref's `auto` does on a GPU."""
    target = tmp_path_factory.mktemp("bf16") / "shards"
    shutil.copytree(shards.parent / "unscored", target)
    return target


def _score_bf16(bf16_shards: Path, model_dir: Path) -> Path:
    if not (bf16_shards / ".scored").exists():
        precompute_ref(PrecomputeRefConfig(shards=str(bf16_shards), model=str(model_dir), dtype="bfloat16"))
        (bf16_shards / ".scored").touch()
    return bf16_shards


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bf16_reference_trains_in_either_dtype(bf16_shards, tiny_model_dir, tmp_path, dtype):
    scored = _score_bf16(bf16_shards, tiny_model_dir)
    out = tmp_path / dtype
    train(_config(scored, tiny_model_dir, out, max_steps=16, log_every=1, dtype=dtype))
    losses = _losses(out)
    # Policy == reference up to bf16 rounding: β·(Δchosen − Δrejected) stays far below 0.05 here.
    assert losses[0] == pytest.approx(np.log(2), abs=0.02)
    assert np.mean(losses[-4:]) < losses[0] - 0.1


def test_bf16_reference_that_is_stale_is_still_refused(bf16_shards, tiny_model_dir, tmp_path):
    scored = _score_bf16(bf16_shards, tiny_model_dir)
    # Off by 3 nats per answer: beyond bf16 rounding of these sums (≈0.01), as another model's values are.
    stale = _edit_ref(scored, tmp_path / "stale", slice(None), lambda v: v - 3.0)
    with pytest.raises(UserError, match="stale"):
        train(_config(stale, tiny_model_dir, tmp_path / "r"))


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


# ---------------------------------------------------------------------------------------------
# LoRA


def test_lora_learns_and_saves_adapter_and_merged_model(shards, tiny_model_dir, tmp_path):  # noqa: F811
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    train(_config(shards, tiny_model_dir, out, max_steps=16, log_every=1, lora_r=8, lora_alpha=16, learning_rate=2e-2))
    losses = _losses(out)
    assert losses[0] == pytest.approx(np.log(2), abs=1e-5)  # a new adapter is the identity: policy == base == reference
    assert np.mean(losses[-4:]) < losses[0] - 0.1
    adapter = AutoPeftModelForCausalLM.from_pretrained(out / "final").eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "final-merged").eval()
    assert not list((out / "final").glob("model*.safetensors"))  # the adapter alone, not a copy of the base
    ids = torch.tensor([[1, 5, 9, 30, 41, 7]])
    with torch.no_grad():
        torch.testing.assert_close(adapter(ids).logits, merged(ids).logits, atol=1e-4, rtol=1e-4)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        assert (base(ids).logits - merged(ids).logits).abs().max() > 1e-3  # training moved it


def test_cpu_offload_on_the_cpu_and_live_reference_under_fsdp_are_refused_in_one_line(shards, tiny_model_dir, tmp_path):  # noqa: F811
    with pytest.raises(UserError, match="on the CPU they are there already"):
        train(_config(shards, tiny_model_dir, tmp_path / "r", parallelism="fsdp", cpu_offload=True, device="cpu"))
    with pytest.raises(ValueError, match="precompute-ref --parallelism fsdp"):
        _config(shards, tiny_model_dir, tmp_path / "r", parallelism="fsdp", reference="live")


def test_lora_refuses_shards_scored_with_another_model(shards, tiny_model_dir, tmp_path):  # noqa: F811
    from train.tiny import build_model

    other = build_model(tiny_model_dir, tmp_path / "other", seed=1)
    with pytest.raises(UserError, match="not the base model"):
        train(_config(shards, other, tmp_path / "r", lora_r=4))
