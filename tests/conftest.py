"""Shared fixtures: tiny tokenizers and models built on the fly (nothing is downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"

CORPUS = [
    "The movie was a delight from start to finish, warm and funny.",
    "I found the plot dull and the acting wooden; a waste of two hours.",
    "What is the capital of France? The capital of France is Paris.",
    "Write a haiku about autumn leaves falling on a quiet pond.",
    "Explain how a hash table works in simple terms, with an example.",
    "Human: hello there, can you help me? Assistant: Of course, what do you need?",
    "system user assistant You are a helpful assistant. Answer briefly and clearly.",
] * 20


@pytest.fixture(scope="session")
def realdata() -> Path:
    if not REALDATA.is_dir():
        pytest.skip(f"{REALDATA} not present (shared/ sits beside the project checkout)")
    return REALDATA


@pytest.fixture(scope="session")
def chat_tokenizer_dir(tmp_path_factory) -> Path:
    """A chat tokenizer (ChatML template, `<|im_end|>` EOS, BOS prepended by the tokenizer)."""
    from train.tiny import CHATML, build_tokenizer

    return build_tokenizer(CORPUS, tmp_path_factory.mktemp("chat-tok"), layout=CHATML)


@pytest.fixture(scope="session")
def base_tokenizer_dir(tmp_path_factory) -> Path:
    """A base-model tokenizer: no chat template, `</s>` EOS."""
    from train.tiny import build_tokenizer

    return build_tokenizer(CORPUS, tmp_path_factory.mktemp("base-tok"), layout=None)


@pytest.fixture(scope="session")
def tiny_model_dir(chat_tokenizer_dir, tmp_path_factory) -> Path:
    """A 2-layer Llama over the chat tokenizer, saved with save_pretrained (tokenizer included)."""
    from train.tiny import build_model

    return build_model(chat_tokenizer_dir, tmp_path_factory.mktemp("tiny-model"))
