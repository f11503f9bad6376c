"""Shard rows → padded chosen/rejected batches, and the orders in which rows are batched.

Used by the reference pass and by the trainer, so both build batches the same way:

- `TokenColumns`: a shard's three token-id columns as flat int32 values + offsets, read without
  copying from a memory-mapped Arrow table; lengths are numpy arithmetic on the offsets.
- `collate_pairs`: rows → one `PairBatch` holding [prompt + chosen] rows then [prompt + rejected]
  rows, right-padded to one length, so both answers go through ONE forward pass.
- `token_budget_batches`: inference order — rows sorted by length, packed up to a budget of
  padded tokens, so padding is small and every batch costs about the same memory.
- `LengthGroupedSampler`: training order — shuffled, sorted only within large random windows
  (length-homogeneous batches without a length curriculum), seeded and resumable.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

TOKEN_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")


@dataclass(frozen=True)
class _ListColumn:
    values: np.ndarray  # int32, every row's ids back to back
    offsets: np.ndarray  # row i is values[offsets[i]:offsets[i + 1]]

    @classmethod
    def from_arrow(cls, column: pa.ChunkedArray | pa.ListArray) -> _ListColumn:
        array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        # `offsets` index into `values` even for a sliced array, so the pair stays consistent.
        return cls(values=array.values.to_numpy(zero_copy_only=False), offsets=array.offsets.to_numpy())

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets).astype(np.int64)

    def row(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]


@dataclass(frozen=True)
class TokenColumns:
    prompt: _ListColumn
    chosen: _ListColumn
    rejected: _ListColumn

    @classmethod
    def from_table(cls, table: pa.Table) -> TokenColumns:
        return cls(*(_ListColumn.from_arrow(table.column(name)) for name in TOKEN_COLUMNS))

    def __len__(self) -> int:
        return len(self.prompt.offsets) - 1

    @property
    def pair_lengths(self) -> np.ndarray:
        """Padded length a pair needs: prompt + the longer answer (both answers share one pad length)."""
        return self.prompt.lengths + np.maximum(self.chosen.lengths, self.rejected.lengths)

    @property
    def real_tokens(self) -> np.ndarray:
        """Tokens a pair puts through the model: the prompt twice (once per answer) and both answers."""
        return 2 * self.prompt.lengths + self.chosen.lengths + self.rejected.lengths

    def max_token_id(self) -> int:
        parts = [c.values for c in (self.prompt, self.chosen, self.rejected) if len(c.values)]
        return max(int(v.max()) for v in parts) if parts else -1


@dataclass(frozen=True)
class PairBatch:
    """B pairs as 2B rows: rows [0, B) are prompt + chosen, rows [B, 2B) prompt + rejected (TRL's
    layout). `completion_mask` is True at answer tokens; padding has attention_mask 0."""

    input_ids: torch.Tensor  # [2B, T] int64
    attention_mask: torch.Tensor  # [2B, T] int64
    completion_mask: torch.Tensor  # [2B, T] bool
    rows: np.ndarray  # the B table rows, in batch order

    def to(self, device: torch.device | str) -> PairBatch:
        move = dict(device=device, non_blocking=True)
        return PairBatch(self.input_ids.to(**move), self.attention_mask.to(**move),
                         self.completion_mask.to(**move), self.rows)

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def padded_tokens(self) -> int:
        return self.input_ids.numel()


def collate_pairs(columns: TokenColumns, rows: np.ndarray, pad_id: int) -> PairBatch:
    """Build the padded tensors for `rows`. `pad_id` only fills masked positions, so its value never
    changes a result; it must just be a valid embedding index."""
    rows = np.asarray(rows, dtype=np.int64)
    n = len(rows)
    width = int(columns.pair_lengths[rows].max())
    ids = np.full((2 * n, width), pad_id, dtype=np.int64)
    attention = np.zeros((2 * n, width), dtype=np.int64)
    completion = np.zeros((2 * n, width), dtype=bool)
    for i, row in enumerate(rows):
        prompt = columns.prompt.row(row)
        for out_row, answer in ((i, columns.chosen.row(row)), (n + i, columns.rejected.row(row))):
            end = len(prompt) + len(answer)
            ids[out_row, : len(prompt)] = prompt
            ids[out_row, len(prompt) : end] = answer
            attention[out_row, :end] = 1
            completion[out_row, len(prompt) : end] = True
    return PairBatch(torch.from_numpy(ids), torch.from_numpy(attention), torch.from_numpy(completion), rows)


def token_budget_batches(pair_lengths: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Row indices, longest pairs first, packed so each batch's padded size (2 rows per pair × the
    longest pair) stays within `batch_tokens`. Longest first: an out-of-memory shows on the first
    batch, not after an hour. A pair longer than the budget gets a batch of its own (never dropped)."""
    order = np.argsort(-pair_lengths, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        width = int(pair_lengths[order[start]])  # the batch's longest pair: rows are sorted
        size = max(1, batch_tokens // (2 * max(width, 1)))
        batches.append(order[start : start + size])
        start += size
    return batches


def processed_tokens(pair_lengths: np.ndarray, batches: list[np.ndarray]) -> int:
    """Tokens a batch plan puts through the model, padding included (2 rows per pair × the
    batch's longest pair). Padding efficiency = real tokens / this."""
    return sum(2 * len(b) * int(pair_lengths[b].max()) for b in batches if len(b))


class LengthGroupedSampler:
    """Training order: each epoch a seeded permutation, cut into windows of `window_batches`
    batches, sorted by length inside each window, cut into batches, and the batches shuffled.

    The order of (epoch, batch_index) is a pure function of the seed, so a resumed run continues
    from a saved position with exactly the batches the uninterrupted run would have seen.
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, *, seed: int, window_batches: int = 64) -> None:
        if batch_size < 1 or window_batches < 1 or len(lengths) == 0:
            raise ValueError("need at least one row, and batch_size and window_batches of at least 1")
        self.lengths = np.asarray(lengths)
        self.batch_size, self.seed, self.window_batches = batch_size, seed, window_batches

    def __len__(self) -> int:
        """Batches per epoch."""
        return -(-len(self.lengths) // self.batch_size)

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))
        window = self.batch_size * self.window_batches
        windows = np.split(order, range(window, len(order), window))
        grouped = np.concatenate([w[np.argsort(self.lengths[w], kind="stable")] for w in windows])
        batches = [grouped[i : i + self.batch_size] for i in range(0, len(grouped), self.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def iter_from(self, epoch: int = 0, batch_index: int = 0) -> Iterator[tuple[int, int, np.ndarray]]:
        """(epoch, batch_index, rows) from a saved position onwards, epoch after epoch, forever;
        the caller stops at its step budget and saves the position of the next batch."""
        while True:
            batches = self.epoch_batches(epoch)
            for index in range(batch_index, len(batches)):
                yield epoch, index, batches[index]
            epoch, batch_index = epoch + 1, 0
