"""LoRA adapters (`peft`, the optional `lora` extra) on the policy.

A new adapter starts as the identity (B = 0), so the policy at step 0 IS the base model: the
reference is the base model, and one `precompute-ref` of the base serves every LoRA run on it.
The adapter is injected into the base model's own Linear modules, so `SequenceScorer` keeps
running the backbone it always runs — the one log-prob function — with the adapters in it.

`final/` holds the adapter (`peft.AutoPeftModelForCausalLM.from_pretrained`), `final-merged/`
the base with the adapter merged in (`AutoModelForCausalLM.from_pretrained`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from schemas.errors import UserError, first_line

ADAPTER_PREFIX = "base_model.model."  # where peft puts the wrapped model's keys


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise UserError("--lora-r needs peft: pip install 'prefdata[lora]'") from None
    return peft


def _is_reward_model(model: torch.nn.Module) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


def add_adapter(model: torch.nn.Module, r: int, alpha: float, dropout: float, target_modules: list[str] | None,
                seed: int) -> Any:
    """The peft model around `model` (changed in place: its Linear layers now carry adapters);
    only adapter weights are trainable — and a reward model's head, which a causal LM checkpoint
    starts new (peft's SEQ_CLS task trains `score` whole). The seed fixes the adapters' A matrices."""
    peft = _peft()
    task = "SEQ_CLS" if _is_reward_model(model) else "CAUSAL_LM"
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, task_type=task,
                             # peft's "all-linear": every Linear of the decoder, never the LM head
                             target_modules=target_modules or "all-linear")
    torch.manual_seed(seed)
    try:
        return peft.get_peft_model(model, config)
    except ValueError as exc:  # a target module the model does not have
        raise UserError(f"--lora-target-modules: {first_line(exc)}") from None


def save_adapter(peft_model: Any, trainable_state: dict[str, torch.Tensor], out_dir: Path) -> None:
    """`trainable_state`: the adapter weights gathered whole, keyed as the causal LM names them."""
    state = {ADAPTER_PREFIX + key: value for key, value in trainable_state.items()}
    peft_model.save_pretrained(out_dir, state_dict=state)


def save_merged(trained: Any | None, base: Any, adapter_dir: Path, out_dir: Path) -> None:
    """The base with the adapter merged in: what serving stacks load. `trained`: the peft model
    as training left it, merged in place (the run is over); None when it is sharded, and `base()`,
    a fresh CPU copy of the base model, takes the saved adapter instead."""
    peft = _peft()
    if trained is None:
        trained = peft.PeftModel.from_pretrained(base(), adapter_dir)
    trained.merge_and_unload().save_pretrained(out_dir)
