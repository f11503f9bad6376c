"""Fingerprints that tie shards to the tokenizer that made them and to the reference model that
scored them. Duck-typed on the transformers objects so this package never imports transformers."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from schemas.manifest import TokenizerFingerprint


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenizer_fingerprint(tokenizer: Any, name_or_path: str) -> TokenizerFingerprint:
    """Hash what decides the token ids: the full tokenizer definition (vocab, merges, normaliser,
    post-processor), the special tokens and the chat template. The path is recorded but not
    hashed, so a model directory's copy of the tokenizer matches the original."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # some tokenizers ship several named templates
        template = json.dumps(template, sort_keys=True)
    specials = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return TokenizerFingerprint(
        name_or_path=name_or_path,
        files_sha256=_sha256_text("\n".join([definition, specials, template or ""])),
        chat_template_sha256=_sha256_text(template) if template else None,
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
