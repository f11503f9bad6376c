"""Which batch layout a run may use with its model: the prefix-shared one only where it gives the
padded layout's numbers, packing only on top of it.

Called by the reference pass (train/reference.py) and the trainer (train/loop.py) before their
first batch; the layouts themselves are built by train/batching.py and scored by
train/logprobs.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from schemas.errors import UserError

SHARING_ATTENTION = ("sdpa", "eager", "flex_attention")  # the kernels that take an arbitrary mask


def prefix_sharing_obstacle(model: torch.nn.Module, pair_lengths: np.ndarray) -> str | None:
    """Why the prefix-shared layout would not give the padded layout's numbers for this model and
    these pairs, or None where it does: its attention must take a custom mask, and no sliding
    window may cut a pair's context (a custom mask replaces the model's window, so it must not
    matter: every pair within it)."""
    config = model.config
    if config._attn_implementation not in SHARING_ATTENTION:
        return f"its attention {config._attn_implementation} takes no mask"
    window = sliding_window(config)
    longest = int(pair_lengths.max()) if len(pair_lengths) else 0
    if window is not None and longest > window:
        return f"a pair of {longest} tokens exceeds its sliding window of {window}"
    return None


def sliding_window(config: Any) -> int | None:
    """The window of the model's sliding-window layers, or None where it has none in use."""
    text_config = config.get_text_config()
    window = getattr(text_config, "sliding_window", None)
    return window if window is not None and getattr(text_config, "use_sliding_window", True) is not False else None


def prefix_sharing_exact(model: torch.nn.Module, pair_lengths: np.ndarray) -> bool:
    return prefix_sharing_obstacle(model, pair_lengths) is None


def check_packing(packing: bool, shared: bool, prefix_sharing: str, model: torch.nn.Module,
                  pair_lengths: np.ndarray) -> None:
    """Packing places prefix-shared pairs side by side: without that layout there is nothing to pack.
    The refusal names the architecture and what stops it, so the user knows whether a flag
    (--prefix-sharing, --attn-implementation) or the model itself is the reason."""
    if packing and not shared:
        why = "--prefix-sharing off" if prefix_sharing == "off" else prefix_sharing_obstacle(model, pair_lengths)
        raise UserError(f"--packing needs the prefix-shared layout, which {model.config.model_type} "
                        f"({type(model).__name__}) cannot use in this run ({why}); drop --packing")
