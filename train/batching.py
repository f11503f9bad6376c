"""Shard rows → padded chosen/rejected batches, and the orders in which rows are batched.

Used by the reference pass and by the trainer, so both build batches the same way:

- `TokenColumns`: a shard's three token-id columns as per-chunk int32 values + offsets, numpy views
  of the memory-mapped Arrow buffers (never copied, never concatenated across chunks or files);
  lengths are numpy arithmetic on the offsets.
- `collate_pairs`: rows → one `PairBatch` holding [prompt + chosen] rows then [prompt + rejected]
  rows, right-padded to one length, so both answers go through ONE forward pass; or, with
  `shared=True`, one row [prompt, chosen, rejected] per pair (prefix sharing, see
  `train/logprobs.py`), so the prompt goes through the model once.
- `token_budget_batches`: inference order — rows sorted by length, packed up to a budget of
  padded tokens, so padding is small and every batch costs about the same memory.
- `LengthGroupedSampler`: training order — shuffled, sorted only within large random windows
  (length-homogeneous batches without a length curriculum), seeded and resumable.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pyarrow as pa
import torch

from schemas.shard import PAIRED, TOKEN_COLUMNS, UNPAIRED


class ChunkIndex:
    """Global row → (chunk, row within the chunk) for a column split over chunks (one or more per
    shard file). The chunks stay where Arrow mapped them; only this [chunks + 1] array is ours."""

    def __init__(self, chunk_rows: list[int]) -> None:
        self.starts = np.concatenate([[0], np.cumsum(chunk_rows, dtype=np.int64)]).astype(np.int64)
        self._starts = self.starts.tolist()  # bisect on a list: ~10x faster than numpy for one row

    def __len__(self) -> int:
        return self._starts[-1]

    def locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < self._starts[-1]:
            raise IndexError(f"row {i} out of range for {self._starts[-1]} rows")
        chunk = bisect.bisect_right(self._starts, i) - 1
        return chunk, int(i) - self._starts[chunk]

    def locate_many(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows out of range for {len(self)} rows")
        chunks = np.searchsorted(self.starts, rows, side="right") - 1
        return chunks, rows - self.starts[chunks]


def _frozen(array: np.ndarray) -> np.ndarray:
    """Cached arrays are shared by every caller: one that wrote into them would change the rest."""
    array.flags.writeable = False
    return array


def _arrow_chunks(column: pa.ChunkedArray | pa.Array) -> list[pa.Array]:
    return list(column.chunks) if isinstance(column, pa.ChunkedArray) else [column]


@dataclass(frozen=True, eq=False)
class _ListColumn:
    """A list<int32> column as per-chunk numpy views of Arrow's own buffers: on a memory-mapped
    shard the token ids are never copied into the process (every torchrun rank shares the page
    cache), and a multi-file split is not concatenated."""

    values: tuple[np.ndarray, ...]  # per chunk: int32 ids, rows back to back
    offsets: tuple[np.ndarray, ...]  # per chunk: local row j is values[c][offsets[c][j]:offsets[c][j + 1]]
    index: ChunkIndex

    @classmethod
    def from_arrow(cls, column: pa.ChunkedArray | pa.ListArray) -> _ListColumn:
        arrays = _arrow_chunks(column)
        # `offsets` index into `values` even for a sliced array, so the pair stays consistent.
        # zero_copy_only: a column that cannot be viewed (nulls, another type) fails loudly
        # instead of being copied in silence.
        values = tuple(a.values.to_numpy(zero_copy_only=True) for a in arrays)
        offsets = tuple(a.offsets.to_numpy(zero_copy_only=True) for a in arrays)
        return cls(values, offsets, ChunkIndex([len(a) for a in arrays]))

    @classmethod
    def empty(cls, rows: int) -> _ListColumn:
        """`rows` rows of no tokens (4 bytes a row of offsets)."""
        return cls((np.zeros(0, dtype=np.int32),), (np.zeros(rows + 1, dtype=np.int32),), ChunkIndex([rows]))

    @cached_property
    def lengths(self) -> np.ndarray:
        """Tokens per row, int64 [N]: 8 bytes a row, the only per-row array we build."""
        parts = [np.diff(o).astype(np.int64) for o in self.offsets]
        return _frozen(np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64))

    def row(self, i: int) -> np.ndarray:
        chunk, j = self.index.locate(i)
        offsets = self.offsets[chunk]
        return self.values[chunk][offsets[j] : offsets[j + 1]]

    def max_id(self) -> int:
        # Only the ids the rows reach: a sliced array's buffer also holds ids outside the slice.
        used = [v[o[0] : o[-1]] for v, o in zip(self.values, self.offsets) if o[-1] > o[0]]
        return max((int(u.max()) for u in used), default=-1)


@dataclass(frozen=True, eq=False)
class TokenColumns:
    """A shard's token columns. `chosen` and `rejected` are a row's two continuations of its
    prompt: a pair's answers, or an unpaired row's completion and KL completion
    (schemas.shard.TOKEN_COLUMNS), laid out and scored alike."""

    prompt: _ListColumn
    chosen: _ListColumn
    rejected: _ListColumn

    @classmethod
    def from_table(cls, table: pa.Table) -> TokenColumns:
        kind = UNPAIRED if TOKEN_COLUMNS[UNPAIRED][1] in table.column_names else PAIRED
        return cls(*(_ListColumn.from_arrow(table.column(name)) for name in TOKEN_COLUMNS[kind]))

    def __len__(self) -> int:
        return len(self.prompt.index)

    @cached_property  # collate_pairs reads it every batch: O(rows) once, not per batch
    def pair_lengths(self) -> np.ndarray:
        """Padded length a pair needs: prompt + the longer answer (both answers share one pad length)."""
        return _frozen(self.prompt.lengths + np.maximum(self.chosen.lengths, self.rejected.lengths))

    @cached_property
    def shared_lengths(self) -> np.ndarray:
        """Length of a pair's prefix-shared row: prompt + chosen + rejected."""
        return _frozen(self.prompt.lengths + self.chosen.lengths + self.rejected.lengths)

    def batch_lengths(self, shared: bool) -> tuple[np.ndarray, int]:
        """(each pair's padded row length, rows per pair) in the layout the batches are built in."""
        return (self.shared_lengths, 1) if shared else (self.pair_lengths, 2)

    @cached_property
    def real_tokens(self) -> np.ndarray:
        """Tokens a pair puts through the model: the prompt twice (once per answer) and both answers."""
        return _frozen(2 * self.prompt.lengths + self.chosen.lengths + self.rejected.lengths)

    @cached_property  # a scan of every token: the policy's and a live reference's checks share it
    def max_token_id(self) -> int:
        return max(c.max_id() for c in (self.prompt, self.chosen, self.rejected))

    @cached_property
    def first_only(self) -> TokenColumns:
        """Each row's prompt and first continuation (the second left empty)."""
        return TokenColumns(self.prompt, self.chosen, _ListColumn.empty(len(self)))

    @cached_property
    def second_only(self) -> TokenColumns:
        """Each row's prompt and second continuation, in the first continuation's place."""
        return TokenColumns(self.prompt, self.rejected, _ListColumn.empty(len(self)))

    def second_apart_is_cheaper(self) -> bool:
        """Whether training on [prompt, first] rows and scoring [prompt, second] rows without
        gradients (3·(P + C) + (P + K) token-passes, backward = 2× forward) costs less than training
        shared rows [prompt, first, second] (3·(P + C + K)): when prompts are shorter than twice the
        second continuations, summed over the rows. For a second continuation that needs no
        gradient: KTO's KL completion."""
        return int(self.prompt.lengths.sum()) < 2 * int(self.rejected.lengths.sum())


@dataclass(frozen=True)
class SharedLayout:
    """What the prefix-shared rows need beyond their ids: positions restart at the end of the
    prompt for the rejected part (and at 0 for each pair packed into a row); `segments` (0
    prompt, 1 chosen, 2 rejected, -1 padding) and `pair` (the pair a token belongs to, -1
    padding) decide who may attend to whom; each scored token's predicting position (`source`:
    the previous position, but the last prompt token for the first rejected token) and output row
    (`row_of`: b for chosen, B + b for rejected, as in the padded layout)."""

    position_ids: torch.Tensor  # [R, T] int64
    segments: torch.Tensor  # [R, T] int8
    source: torch.Tensor  # [R, T] int64
    row_of: torch.Tensor  # [R, T] int64
    pair: torch.Tensor  # [R, T] int64

    def to(self, device: torch.device | str) -> SharedLayout:
        return SharedLayout(*(t.to(device=device, non_blocking=True) for t in
                              (self.position_ids, self.segments, self.source, self.row_of, self.pair)))


@dataclass(frozen=True)
class PairBatch:
    """B pairs as 2B rows: rows [0, B) are prompt + chosen, rows [B, 2B) prompt + rejected (TRL's
    layout); or, with `shared`, B rows [prompt, chosen, rejected] (one row when packed: the pairs
    back to back). `completion_mask` is True at answer tokens; padding has
    attention_mask 0."""

    input_ids: torch.Tensor  # [2B, T] int64 ([R, T] shared)
    attention_mask: torch.Tensor  # [2B, T] int64
    completion_mask: torch.Tensor  # [2B, T] bool
    rows: np.ndarray  # the B table rows, in batch order
    shared: SharedLayout | None = None
    # With `Collator(second_apart=True)`: this batch holds [prompt, first continuation] rows and
    # `apart` the [prompt, second continuation] rows, which `sequence_logps` scores without gradients.
    apart: PairBatch | None = None

    def to(self, device: torch.device | str) -> PairBatch:
        move = dict(device=device, non_blocking=True)
        return PairBatch(self.input_ids.to(**move), self.attention_mask.to(**move), self.completion_mask.to(**move),
                         self.rows, self.shared.to(device) if self.shared is not None else None,
                         self.apart.to(device) if self.apart is not None else None)

    @property
    def real_tokens(self) -> int:
        """Prompt twice and both answers in either layout: what a trainer without prefix sharing
        (TRL's counter) processes, so tokens/s stay comparable."""
        if self.apart is not None:
            return self.computed_tokens
        prompt_again = int((self.shared.segments == 0).sum()) if self.shared is not None else 0
        return int(self.attention_mask.sum()) + prompt_again

    @property
    def computed_tokens(self) -> int:
        """Non-padding tokens that actually go through the model."""
        return int(self.attention_mask.sum()) + (self.apart.computed_tokens if self.apart is not None else 0)

    @property
    def padded_tokens(self) -> int:
        return self.input_ids.numel() + (self.apart.padded_tokens if self.apart is not None else 0)


def collate_pairs(columns: TokenColumns, rows: np.ndarray, pad_id: int, shared: bool = False,
                  packed: bool = False, bucketed: bool = False) -> PairBatch:
    """Build the padded tensors for `rows`. `pad_id` only fills masked positions, so its value never
    changes a result; it must just be a valid embedding index. `packed` (with `shared`): the
    batch is ONE row, its pairs back to back, without padding. `bucketed`: every row padded up to
    `packed_width`, whole FlexAttention tiles, for that kernel."""
    rows = np.asarray(rows, dtype=np.int64)
    if shared:
        bins = [list(range(len(rows)))] if packed else [[k] for k in range(len(rows))]
        return _collate_shared(columns, rows, bins, pad_id, bucketed)
    n = len(rows)
    width = int(columns.pair_lengths[rows].max())
    width = packed_width(width) if bucketed else width
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


@dataclass(frozen=True)
class Collator:
    """`collate_pairs` with the pad id and the layout a run chose, bound once."""

    pad_id: int
    shared: bool = False
    packed: bool = False
    bucketed: bool = False  # rows padded to `packed_width`: for FlexAttention
    second_apart: bool = False  # the second continuations in a batch of their own (`PairBatch.apart`)

    def batch_lengths(self, columns: TokenColumns) -> tuple[np.ndarray, int]:
        """(each pair's row length as this collator builds it, rows per pair): what a token budget
        must count. A bucketed row is its `packed_width`; a packed batch's one row is budgeted by
        its tokens (bucketed, it is at most a tile wider, past 8 tiles a quarter)."""
        lengths, rows_per_pair = columns.batch_lengths(self.shared)
        return (packed_widths(lengths) if self.bucketed and not self.packed else lengths), rows_per_pair

    def processed_tokens(self, lengths: np.ndarray, batches: list[np.ndarray], rows_per_pair: int) -> int:
        """Tokens the batches this collator builds put through the model, padding included
        (`lengths`, `rows_per_pair`: its `batch_lengths`); a packed batch is one row of all its pairs."""
        if not self.packed:
            return processed_tokens(lengths, batches, rows_per_pair)
        widths = [int(lengths[b].sum()) for b in batches if len(b)]
        return sum(packed_width(width) if self.bucketed else width for width in widths)

    def __call__(self, columns: TokenColumns, rows: np.ndarray) -> PairBatch:
        if not self.second_apart:
            return collate_pairs(columns, rows, self.pad_id, self.shared, self.packed, self.bucketed)
        first, second = (collate_pairs(view, rows, self.pad_id, self.shared, self.packed, self.bucketed)
                         for view in (columns.first_only, columns.second_only))
        return dataclasses.replace(first, apart=second)


FLEX_TILE = 128  # FlexAttention's default block size


def packed_widths(tokens: np.ndarray) -> np.ndarray:
    """`packed_width` of each length."""
    tiles = -(-np.asarray(tokens, dtype=np.int64) // FLEX_TILE)
    step = np.left_shift(1, np.maximum(np.frexp(tiles)[1] - 3, 0))  # frexp's exponent: the bit length
    return -(-tiles // step) * step * FLEX_TILE


def packed_width(tokens: int) -> int:
    """The width a row of `tokens` tokens is padded to for FlexAttention (prefix-shared or packed
    rows, and plain ones): whole tiles, and past 8 tiles one of 4 widths per doubling (at most a
    quarter more than its tokens). Whole tiles, because torch 2.13's FlexAttention scored rows
    whose length is not a tile multiple wrongly on this CPU (a NaN, or 3e-3 to 1.7e-2 nats off,
    from call to call, by hand: 7 prefix-shared rows of 24 tokens, single short rows; exact at a
    whole tile), and torch has reports of the same with a kv length that is not a block multiple
    on CUDA. Few widths, because a packed row's length changes every batch and the compiled kernel
    is rebuilt for every new shape (past dynamo's recompile limit it falls back to eager); so it
    meets O(log T) shapes, not one per batch."""
    return int(packed_widths(np.array([tokens]))[0])


def _collate_shared(columns: TokenColumns, rows: np.ndarray, bins: list[list[int]], pad_id: int,
                    bucketed: bool = False) -> PairBatch:
    """Each bin (pair places k, output rows k and B + k) becomes one row: its pairs back to back,
    each [prompt, chosen, rejected] with positions from 0; `bucketed`: padded to `packed_width`."""
    n = len(rows)
    lengths = columns.shared_lengths[rows]
    width = max(int(lengths[b].sum()) for b in bins)
    width = packed_width(width) if bucketed else width
    ids = np.full((len(bins), width), pad_id, dtype=np.int64)
    positions = np.zeros((len(bins), width), dtype=np.int64)
    segments = np.full((len(bins), width), -1, dtype=np.int8)
    source = np.zeros((len(bins), width), dtype=np.int64)
    row_of = np.zeros((len(bins), width), dtype=np.int64)
    pair = np.full((len(bins), width), -1, dtype=np.int64)
    for i, members in enumerate(bins):
        start = 0
        for k in members:
            row = rows[k]
            prompt, chosen, rejected = columns.prompt.row(row), columns.chosen.row(row), columns.rejected.row(row)
            p, c, r = len(prompt), len(chosen), len(rejected)
            at = slice(start, start + p + c + r)
            ids[i, at] = np.concatenate([prompt, chosen, rejected])
            positions[i, at] = np.concatenate([np.arange(p + c), np.arange(p, p + r)])
            segments[i, at] = np.repeat(np.array([0, 1, 2], dtype=np.int8), [p, c, r])
            pair[i, at] = k
            source[i, start + p : at.stop] = np.arange(start + p - 1, at.stop - 1)
            if r:  # the first rejected token follows the prompt, not the chosen answer
                source[i, start + p + c] = start + p - 1
            row_of[i, start + p : start + p + c], row_of[i, start + p + c : at.stop] = k, n + k
            start = at.stop
    layout = SharedLayout(*map(torch.from_numpy, (positions, segments, source, row_of, pair)))
    completion = torch.from_numpy(segments > 0)
    return PairBatch(torch.from_numpy(ids), torch.from_numpy((segments >= 0).astype(np.int64)), completion, rows, layout)


def token_budget_batches(lengths: np.ndarray, batch_tokens: int, rows_per_pair: int = 2) -> list[np.ndarray]:
    """Row indices, longest pairs first, packed so each batch's padded size (rows per pair × the
    longest pair) stays within `batch_tokens`. Longest first: an out-of-memory shows on the first
    batch, not after an hour. A pair longer than the budget gets a batch of its own (never dropped).
    `lengths`, `rows_per_pair`: `TokenColumns.batch_lengths` of the layout."""
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        width = int(lengths[order[start]])  # the batch's longest pair: rows are sorted
        size = max(1, batch_tokens // (rows_per_pair * max(width, 1)))
        batches.append(order[start : start + size])
        start += size
    return batches


def processed_tokens(lengths: np.ndarray, batches: list[np.ndarray], rows_per_pair: int = 2) -> int:
    """Tokens a batch plan puts through the model, padding included (rows per pair × the
    batch's longest pair)."""
    return sum(rows_per_pair * len(b) * int(lengths[b].max()) for b in batches if len(b))


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

    def steps_from(self, epoch: int, batch_index: int,
                   accumulation: int) -> Iterator[tuple[int, tuple[int, int], list[np.ndarray]]]:
        """Optimizer steps from a saved position onwards, epoch after epoch, forever: each step
        `accumulation` consecutive batches of one epoch (its last step holds what is left), as
        (its epoch, the position of the batch after it, which a checkpoint saves, its batches). A
        step never reaches into the next epoch, so every pair is used exactly once per epoch."""
        while True:
            batches = self.epoch_batches(epoch)
            for start in range(batch_index, len(batches), accumulation):
                end = min(start + accumulation, len(batches))
                yield epoch, ((epoch, end) if end < len(batches) else (epoch + 1, 0)), batches[start:end]
            epoch, batch_index = epoch + 1, 0

    def steps_per_epoch(self, accumulation: int) -> int:
        return -(-len(self) // accumulation)
