"""The last decoder layer at the positions read, not at every position.

A reward model reads the last hidden state at two positions per pair (each answer's last token).
Every position still feeds the last layer's keys and values, but that layer's queries, attention,
output projection and MLP matter only where the state is read. `install` makes the last layer of
a model compute just that, when the model is called with `READ_AT` (a `ReadAt`) among its
keyword arguments, which transformers' decoders pass on to every layer. The layer runs in two
calls of its own forward, as a black box:

1. over every position, stopped by an exception the moment its attention hands the cache the
   keys and values (`_StopAtCache`): the input norm, the q/k/v projections and the rotary
   embedding have run, nothing after them;
2. over the read positions alone: its cache hands back those keys and values (`_ReplayCache`),
   and the attention mask is the rows of those positions' queries.

No model's internals are copied here: every transformers decoder's attention passes its keys and
values through `cache.update` (that is how generation caches them). A layer that does not
(gradient checkpointing sets its cache to None; an architecture without a cache) runs whole in
call 1, and its output is read at the positions: the same numbers, without the saving.

What it saves is most of one layer: on the bench's 4-layer model about a quarter of the decoder's
work (HH reward steps 22–26% faster by hand), on an L-layer model about 1/L of a step (3–4% at
24–32 layers). With dropout on, the read queries draw theirs in call 2: the same distribution as a
whole layer's, other draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MethodType
from typing import Any

import torch

from train.masks import additive

READ_AT = "prefdata_read_at"  # the keyword a `ReadAt` travels under, through the model to its last layer
QUERY_MASK_KERNELS = ("sdpa", "eager")  # attention kernels that take a mask for a subset of the queries
# The decoders whose reward models tests/test_rewards.py checks read this way (their rewards and
# every gradient equal their own forward's); any other runs its last layer whole.
MODEL_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
                         "phi3", "olmo2", "stablelm", "starcoder2"})


@dataclass(frozen=True)
class ReadAt:
    """Where the last layer's output is read: slot j of row r is position `positions[r, j]` of that
    row ([R, S], `slots`). `query_mask` [R, 1, S, T] is
    the additive attention mask of those queries (the rows of the whole mask at those positions).
    The model's output (`last_hidden_state`) is then [R, S, H]: slot j of row r."""

    positions: torch.Tensor
    query_mask: torch.Tensor

    @property
    def rows(self) -> torch.Tensor:
        return torch.arange(self.positions.shape[0], device=self.positions.device)[:, None].expand_as(self.positions)


def slots(rows: torch.Tensor, positions: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([R, S] positions read per row, [N] the slot of each read) for N reads at (`rows`, `positions`):
    each row's reads in their order; spare slots read position 0, a real token of every right-padded
    row, and are never looked at."""
    counts = torch.bincount(rows, minlength=num_rows)
    order = torch.argsort(rows, stable=True)
    slot = torch.empty_like(rows)
    slot[order] = torch.arange(len(rows), device=rows.device) - (torch.cumsum(counts, 0) - counts)[rows[order]]
    table = torch.zeros(num_rows, max(int(counts.max()), 1), dtype=positions.dtype, device=positions.device)
    table[rows, slot] = positions
    return table, slot


def causal_query_mask(positions: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """[R, 1, S, T] additive mask of queries at `positions` [R, S] in causal rows of `length` tokens."""
    keys = torch.arange(length, device=positions.device)
    return additive(keys[None, None, :] <= positions[:, :, None], dtype)[:, None]


def rows_of_mask(mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The [R, 1, S, T] rows of a [R, 1, T, T] mask at the query `positions` [R, S]."""
    rows = torch.arange(mask.shape[0], device=mask.device)[:, None]
    return mask[rows, 0, positions][:, None]


def install(model: torch.nn.Module) -> bool:
    """Makes `model`'s last decoder layer honour `READ_AT`; False where it does not: a decoder not in
    MODEL_TYPES, one set to attend both ways, or an attention kernel that takes no mask for a subset
    of queries (FlexAttention's block mask, flash attention)."""
    layers = getattr(model.base_model, "layers", None)
    if model.config.model_type not in MODEL_TYPES or not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        return False
    if getattr(model.config.get_text_config(), "use_bidirectional_attention", False):  # Gemma 3's option: not causal
        return False
    if model.config._attn_implementation not in QUERY_MASK_KERNELS:
        return False
    last = layers[-1]
    if getattr(last.forward, "__func__", None) is not _read_at_forward:
        last.forward = MethodType(_read_at_forward, last)
    return True


class _KeysAndValues(Exception):  # noqa: N818 (not an error: call 1's way out of the layer)
    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__("the last layer's keys and values")
        self.keys, self.values = keys, values


class _StopAtCache:
    """Call 1's cache: takes the layer's keys and values and stops the layer there."""

    def update(self, keys: torch.Tensor, values: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        raise _KeysAndValues(keys, values)


class _ReplayCache:
    """Call 2's cache: hands the read queries every position's keys and values from call 1 (their
    own, computed again from the same states, are the same and not needed)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values

    def update(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys, self.values


# Run eagerly under torch.compile (`--compile`): dynamo resolved `type(layer).forward` to this very
# method, the layer's instance attribute, and recursed without end.
@torch.compiler.disable
def _read_at_forward(layer: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """The last layer's forward: its class's own (transformers' checkpointing wrapper included)
    without `READ_AT`; with it, the two calls of the module docstring, [R, S, H] out."""
    forward = type(layer).forward.__get__(layer)
    read_at: ReadAt | None = kwargs.pop(READ_AT, None)
    if read_at is None:
        return forward(hidden_states, *args, **kwargs)
    rows, positions = read_at.rows, read_at.positions
    keys_values = None
    if args:  # more than the states by position (transformers' decoders pass them by name): whole
        whole = forward(hidden_states, *args, **kwargs)
    else:
        try:
            whole = forward(hidden_states, **{**kwargs, "cache": _StopAtCache()})
        except _KeysAndValues as stopped:
            # Call 2 runs after the except block: the exception's frames hold call 1's queries.
            keys_values = stopped.keys, stopped.values
    if keys_values is None:  # the layer read no cache, so it ran whole: its output at the read positions
        return _first(whole, lambda state: state[rows, positions])
    batch = hidden_states.shape[:2]
    read = {name: _at_reads(value, batch, rows, positions) for name, value in kwargs.items()
            if name not in ("attention_mask", "cache")}
    return forward(hidden_states[rows, positions], **read, attention_mask=read_at.query_mask, cache=_ReplayCache(*keys_values))


def _at_reads(value: Any, batch: torch.Size, rows: torch.Tensor, positions: torch.Tensor) -> Any:
    """A per-position keyword argument ([R or 1, T, …]: position ids, the rotary cos and sin) at the
    read positions; anything else as it is."""
    if isinstance(value, tuple):
        return tuple(_at_reads(item, batch, rows, positions) for item in value)
    if torch.is_tensor(value) and value.dim() >= 2 and value.shape[1] == batch[1] and value.shape[0] in (1, batch[0]):
        return value.expand(batch[0], *value.shape[1:])[rows, positions]
    return value


def _first(out: Any, transform: Any) -> Any:
    """A layer's output (a tensor, or a tuple starting with one) with `transform` applied to its hidden states."""
    return (transform(out[0]), *out[1:]) if isinstance(out, tuple) else transform(out)
