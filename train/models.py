"""Finding, fingerprinting and loading a causal LM and its tokenizer: one way for the reference
pass and the trainer, with one-line errors for every way a model directory can be unusable."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from schemas.errors import UserError, first_line
from schemas.fingerprint import tokenizer_fingerprint
from schemas.io import sha256_file, sha256_files_cached
from schemas.manifest import ModelFingerprint, TokenizerFingerprint
from train.device import dtype_name

WEIGHT_SUFFIXES = (".safetensors", ".bin")


def model_dir(name_or_path: str) -> Path:
    """A local directory as is; a Hub name through the Hub cache (offline: the cache only)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.is_absolute() or name_or_path.startswith(".") or path.exists() or name_or_path.count("/") > 1:
        raise UserError(f"model {name_or_path}: no such directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model", "*.txt"]))
    except Exception as exc:  # any reason the Hub cannot give us the model is the user's to fix
        raise UserError(f"model {name_or_path}: cannot fetch it ({type(exc).__name__}); pass a local model directory") from None


def _files_digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path, file_sha in zip(paths, sha256_files_cached(paths)):
        digest.update(f"{path.name}\0{file_sha}\n".encode())
    return digest.hexdigest()


def model_fingerprint(directory: Path, name_or_path: str, dtype: torch.dtype, device: torch.device) -> ModelFingerprint:
    """Hashes of the config and every weight file. Each file is read in full once; later runs take
    its hash from the user's cache (schemas.io.sha256_files_cached) while it is unchanged."""
    config = directory / "config.json"
    weights = sorted(p for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES and not p.name.startswith("."))
    if not config.is_file() or not weights:
        raise UserError(f"model {name_or_path}: needs config.json and *.safetensors (or *.bin) weights in {directory}")
    return ModelFingerprint(name_or_path=name_or_path, config_sha256=sha256_file(config),  # small: not cached
                            weights_sha256=_files_digest(weights), dtype=dtype_name(dtype), device_type=device.type)


def same_weights(a: ModelFingerprint | None, b: ModelFingerprint) -> bool:
    """Same config and weight files (the path may differ: a copied model is the same model)."""
    return a is not None and (a.config_sha256, a.weights_sha256) == (b.config_sha256, b.weights_sha256)


def load_model_tokenizer(directory: Path, name_or_path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise UserError(f"model {name_or_path}: cannot load its tokenizer ({first_line(exc)}); "
                        "save the tokenizer the shards were made with beside the model") from None


def check_tokenizer(directory: Path, name_or_path: str, expected: TokenizerFingerprint | None) -> Any:
    """The model's tokenizer must be the one the shards were made with; returns it."""
    tokenizer = load_model_tokenizer(directory, name_or_path)
    if expected is not None and tokenizer_fingerprint(tokenizer, name_or_path).files_sha256 != expected.files_sha256:
        raise UserError(f"model {name_or_path}: its tokenizer differs from the one the shards were made with "
                        f"({expected.name_or_path}); re-run prefdata tokenize with --tokenizer {name_or_path}")
    return tokenizer


def check_fits(model: Any, name_or_path: str, columns: Any, where: str) -> None:
    """The shards' rows (`columns`, a batching.TokenColumns) must be ids of the model's vocabulary
    and fit its positions: a smaller embedding fails inside the forward with an IndexError, and
    positions past the trained ones score silently (RoPE) or fail (learned positions)."""
    vocabulary = model.get_input_embeddings().num_embeddings
    if len(columns) and columns.max_token_id >= vocabulary:
        raise UserError(f"model {name_or_path}: {where} hold token id {columns.max_token_id} but its vocabulary has "
                        f"{vocabulary} entries; the shards were made for another model")
    text = model.config.get_text_config()  # a multimodal model's language model holds the limit
    positions = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    rope = getattr(text, "rope_scaling", None) or {}
    if positions and rope.get("factor") and rope.get("original_max_position_embeddings"):  # YaRN and the like run longer
        positions = max(positions, int(rope["factor"] * rope["original_max_position_embeddings"]))
    longest = int(columns.pair_lengths.max()) if len(columns) else 0
    if positions and longest > positions:
        raise UserError(f"model {name_or_path}: {where} hold a row of {longest} tokens, past the model's {positions} positions; "
                        f"re-run prefdata tokenize with --max-length {positions} or less")


def attention_kernel(requested: str | None, packing: bool, device: torch.device) -> str | None:
    """The attention `from_pretrained` loads the model with for computing on `device` (None:
    transformers' default, SDPA). Packed rows on CUDA get FlexAttention: its block mask skips every
    tile outside the pairs' own blocks, so a packed row's attention costs the sum of its pairs'
    squares, not the row's square, which a dense SDPA mask pays (README, "Packing"). FlexAttention
    is refused off CUDA: torch 2.13 has no backward for it on CPU, and its compiled CPU forward
    fails to build once batch shapes change."""
    kernel = requested or ("flex_attention" if packing and device.type == "cuda" else None)
    if kernel == "flex_attention" and device.type != "cuda":
        raise UserError(f"--attn-implementation flex_attention runs on CUDA only (this run computes on {device.type}); "
                        "use sdpa or eager")
    return kernel


def instantiate(auto_class: Any, directory: Path, name_or_path: str, dtype: torch.dtype, attn_implementation: str | None,
                weights: bool, what: str = "it", new_weights: frozenset[str] = frozenset(), **config_overrides: Any) -> Any:
    """`auto_class` (AutoModelForCausalLM, AutoModelForSequenceClassification) from `directory`,
    on the CPU, in `dtype`. Any load failure is a one-line UserError, and so is a checkpoint that
    lacks weights of the model other than `new_weights` (those a new head starts at random).

    `weights=False`: the architecture only, its parameters on the meta device (no memory), for
    the FSDP processes that receive their shard of the weights from rank 0 instead of reading
    the whole model themselves; built with the same attention kernel and config overrides."""
    from transformers import AutoConfig

    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        if not weights:
            with torch.device("meta"):
                return auto_class.from_config(AutoConfig.from_pretrained(directory, **config_overrides), **kwargs)
        model, loading = auto_class.from_pretrained(directory, **kwargs, **config_overrides, output_loading_info=True)
    except Exception as exc:  # corrupt weights, unknown architecture, bad attn name: all one-line errors
        raise UserError(f"model {name_or_path}: cannot load {what}: {first_line(exc)}") from None
    missing = sorted(set(loading.get("missing_keys") or ()) - new_weights)
    if missing:  # transformers starts them at random and goes on: a reward model's checkpoint read as a causal LM, say
        listed = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise UserError(f"model {name_or_path}: cannot load {what}: the checkpoint has no {listed} (transformers would start "
                        "them at random); is it another kind of model, such as a reward model?")
    return model


def load_causal_lm(directory: Path, name_or_path: str, dtype: torch.dtype, device: torch.device,
                   attn_implementation: str | None = None, weights: bool = True) -> tuple[Any, Any]:
    """(model on `device` in `dtype`, tokenizer); `weights=False`: on the meta device (`instantiate`)."""
    from transformers import AutoModelForCausalLM

    from train.rewards import is_reward_model

    if is_reward_model(directory):  # a tied LM head would load from its embeddings without a missing weight
        raise UserError(f"model {name_or_path}: a reward model (a sequence classifier), where a causal LM is needed")
    model = instantiate(AutoModelForCausalLM, directory, name_or_path, dtype, attn_implementation, weights)
    model = model.to(device) if weights else model
    check_scoring_matches_forward(model, name_or_path)
    return model, load_model_tokenizer(directory, name_or_path)


def padding_id(tokenizer: Any) -> int:
    """The id padded positions hold, for every stage that pads (train, precompute-ref, generate,
    eval). Padding is masked out of attention and scoring, so any id in the vocabulary serves; a
    tokenizer without a pad token (GPT-2, Llama 3 base) pads with its EOS, which `generate`
    also accepts as padding, and 0 where it has neither."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _is_dropout_rate(name: str, value: Any) -> bool:
    # `*dropout*` (attention_dropout, hidden_dropout), GPT-2's `*_pdrop`, OPT's `layerdrop`
    return isinstance(value, float) and ("dropout" in name or name.endswith("pdrop") or name == "layerdrop")


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off wherever a model keeps it: dropout modules (GPT-2, OPT, Phi), the float rates
    layers keep as attributes and read at call time (Llama's and Qwen's `attention_dropout`, passed
    to SDPA while training), and the rates some read from their config at call time (Falcon's
    `hidden_dropout`), in the config of every sub-model."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if _is_dropout_rate(name, value):
                setattr(module, name, 0.0)
        config = getattr(module, "config", None)
        for name, value in (list(vars(config).items()) if config is not None and hasattr(config, "to_dict") else []):
            if _is_dropout_rate(name, value):
                setattr(config, name, 0.0)


def check_scoring_matches_forward(model: Any, name_or_path: str) -> None:
    """train/logprobs.py skips the model's forward (it projects only scored positions), so an
    architecture that transforms its logits in a way we do not repeat would be scored wrongly,
    and neither --verify nor the step-0 check could tell (both use the same function). One
    16-token row through both paths tells: two forwards of 16 tokens, once per load."""
    from train.arch_guard import forward_disagreement

    if any(p.device.type == "meta" for p in model.parameters()):
        return  # no weights to run yet (deferred init); the caller checks once they exist
    diff, tolerance = forward_disagreement(model)
    if not diff <= tolerance:  # `not <=`: a NaN difference fails too
        config = model.config
        raise UserError(
            f"model {name_or_path}: architecture {config.model_type} ({type(model).__name__}) changes its logits in a way "
            f"train/logprobs.py does not reproduce (log-probs differ from its own forward by {diff:.3g} > {tolerance:.3g} "
            f"in {dtype_name(next(model.parameters()).dtype)}); use a supported architecture, or add its transform to _final_logits"
        )
