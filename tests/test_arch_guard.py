"""The architecture guard (issue 13, item 5): `load_causal_lm` scores one short row both through
train/logprobs.py and through the model's own forward, and refuses an architecture whose logits
the chunked path does not reproduce."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    CohereConfig,
    Gemma2Config,
    GraniteConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
)

import train.logprobs as logprobs
from schemas.errors import UserError
from train.arch_guard import forward_disagreement
from train.models import check_scoring_matches_forward, load_causal_lm

CPU = torch.device("cpu")


class TemperedLlamaConfig(LlamaConfig):
    """A Llama whose forward divides its logits by `output_temperature`: a transform that
    `_final_logits` does not know."""

    model_type = "prefdata_test_tempered_llama"

    def __init__(self, output_temperature: float = 1.0, **kwargs):
        self.output_temperature = output_temperature
        super().__init__(**kwargs)


class TemperedLlamaForCausalLM(LlamaForCausalLM):
    config_class = TemperedLlamaConfig

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits / self.config.output_temperature
        return out


AutoConfig.register(TemperedLlamaConfig.model_type, TemperedLlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(TemperedLlamaConfig, TemperedLlamaForCausalLM, exist_ok=True)


def _save(config, tokenizer_dir: Path, out: Path) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config.vocab_size = len(tokenizer)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
ARCHITECTURES = {
    "llama": lambda: LlamaConfig(**COMMON),
    "qwen2": lambda: Qwen2Config(**COMMON),
    # The transforms _final_logits repeats, at values that change the logits visibly.
    "gemma2": lambda: Gemma2Config(**COMMON, head_dim=8, final_logit_softcapping=0.5, initializer_range=0.5),
    "cohere": lambda: CohereConfig(**COMMON, logit_scale=3.0),
    "granite": lambda: GraniteConfig(**COMMON, logits_scaling=0.25),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_known_architectures_pass_the_guard(arch, dtype, chat_tokenizer_dir, tmp_path):
    directory = _save(ARCHITECTURES[arch](), chat_tokenizer_dir, tmp_path / arch)
    model, _ = load_causal_lm(directory, arch, dtype, CPU)
    assert model.dtype == dtype
    diff, tolerance = forward_disagreement(model)
    assert diff <= tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_an_unknown_logit_transform_is_refused_in_one_line_naming_the_architecture(dtype, chat_tokenizer_dir, tmp_path):
    directory = _save(TemperedLlamaConfig(**COMMON, output_temperature=0.5, initializer_range=0.2),
                      chat_tokenizer_dir, tmp_path / "tempered")
    with pytest.raises(UserError) as info:
        load_causal_lm(directory, "tempered", dtype, CPU)
    message = str(info.value)
    assert "\n" not in message
    assert TemperedLlamaConfig.model_type in message and "TemperedLlamaForCausalLM" in message


def test_the_same_model_without_the_transform_passes(chat_tokenizer_dir, tmp_path):
    # Control for the test above: same class, temperature 1 → nothing to reproduce.
    directory = _save(TemperedLlamaConfig(**COMMON, output_temperature=1.0, initializer_range=0.2),
                      chat_tokenizer_dir, tmp_path / "plain")
    load_causal_lm(directory, "plain", torch.float32, CPU)


def test_a_transform_our_path_forgets_is_caught(chat_tokenizer_dir, tmp_path, monkeypatch):
    """If _final_logits lost Gemma 2's soft-cap, the guard (not silence) would say so."""
    directory = _save(ARCHITECTURES["gemma2"](), chat_tokenizer_dir, tmp_path / "gemma2")
    model, _ = load_causal_lm(directory, "gemma2", torch.float32, CPU)
    monkeypatch.setattr(logprobs, "_final_logits", lambda logits, config: logits)
    with pytest.raises(UserError, match="gemma2 \\(Gemma2ForCausalLM\\)"):
        check_scoring_matches_forward(model, "gemma2")


def test_the_guard_leaves_the_training_mode_as_it_was(tiny_model_dir):
    model, _ = load_causal_lm(tiny_model_dir, "tiny", torch.float32, CPU)
    model.train()
    check_scoring_matches_forward(model, "tiny")
    assert model.training
    model.eval()
    check_scoring_matches_forward(model, "tiny")
    assert not model.training
