"""Word n-gram shingles, MinHash signatures and LSH clustering, vectorised with numpy.

No per-row Python: texts are split and hashed by polars, shingles are rolled in numpy, MinHash is
a multiply-shift hash family applied to blocks of shingles with `np.minimum.reduceat` per text,
LSH bands are grouped with `np.unique`, and clusters are the connected components
(`scipy.sparse.csgraph`) of candidate pairs whose estimated Jaccard passes the threshold.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl

_MIX = np.uint64(0x9E3779B97F4A7C15)  # golden-ratio constant: rolls word hashes into an n-gram hash
_SHINGLES_PER_BLOCK = 1 << 18  # bounds the [shingles, permutations] block to ~256 MiB at 128 perms


def shingles(texts: pl.Series, ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """(text index, shingle hash) for every word `ngram`-gram of every text, grouped by text in
    order. A text shorter than `ngram` words gives one shingle (all its words), so every text has
    at least one. Texts must already be normalised with single spaces."""
    words = texts.str.split(" ")
    lengths = words.list.len().to_numpy().astype(np.int64)
    word_hashes = words.explode().hash(seed=0).to_numpy()
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    per_text = np.maximum(lengths - ngram + 1, 1)
    text_index = np.repeat(np.arange(len(lengths)), per_text)
    first_of_text = np.repeat(np.cumsum(per_text) - per_text, per_text)
    starts = offsets[text_index] + (np.arange(per_text.sum()) - first_of_text)
    width = np.minimum(lengths, ngram)[text_index]
    acc = np.zeros(len(text_index), dtype=np.uint64)
    for k in range(ngram):
        valid = k < width
        acc = np.where(valid, acc * _MIX + word_hashes[np.where(valid, starts + k, 0)], acc)
    return text_index, acc


def minhash(text_index: np.ndarray, shingle_hashes: np.ndarray, n_texts: int, num_perm: int, seed: int) -> np.ndarray:
    """[n_texts, num_perm] uint32 MinHash signatures. Permutation k is the multiply-shift hash
    ((a_k·x + b_k) mod 2^64) >> 32 with odd a_k: a universal family, cheap in uint64 numpy.

    Shingles are hashed in blocks that end on a text boundary, in place (no temporaries), on two
    threads: numpy releases the GIL in ufuncs, and this is the stage's hot loop."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) | np.uint64(1)
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    text_starts = np.flatnonzero(np.r_[True, text_index[1:] != text_index[:-1]])
    signatures = np.empty((n_texts, num_perm), dtype=np.uint32)
    block_ends = np.searchsorted(text_starts, np.arange(_SHINGLES_PER_BLOCK, len(text_index), _SHINGLES_PER_BLOCK), side="right")
    blocks = [(first, last) for first, last in zip(np.r_[0, block_ends], np.r_[block_ends, len(text_starts)]) if first < last]

    def sign_block(block: tuple[int, int]) -> None:
        first, last = block
        lo = text_starts[first]
        hi = text_starts[last] if last < len(text_starts) else len(text_index)
        hashed = np.empty((hi - lo, num_perm), dtype=np.uint64)
        np.multiply(shingle_hashes[lo:hi, None], a[None, :], out=hashed)
        hashed += b
        hashed >>= np.uint64(32)
        signatures[first:last] = np.minimum.reduceat(hashed, text_starts[first:last] - lo, axis=0)

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(sign_block, blocks))
    return signatures


# Every LSH candidate is verified against its estimated Jaccard, so a false positive costs only a
# comparison while a false negative loses a duplicate: the band layout is tuned for recall.
FALSE_POSITIVE_WEIGHT, FALSE_NEGATIVE_WEIGHT = 0.1, 0.9


def signatures(texts: pl.Series, ngram: int, num_perm: int, seed: int, chunk_texts: int = 100_000) -> np.ndarray:
    """MinHash signatures of word n-gram shingles, [len(texts), num_perm] uint32, computed a chunk
    of texts at a time so the shingle arrays never exist for the whole input at once."""
    out = np.empty((len(texts), num_perm), dtype=np.uint32)
    for start in range(0, len(texts), chunk_texts):
        chunk = texts.slice(start, chunk_texts)
        index, grams = shingles(chunk, ngram)
        out[start:start + len(chunk)] = minhash(index, grams, len(chunk), num_perm, seed)
    return out


def shares_shingle(texts: pl.Series, ngram: int, reference: np.ndarray, chunk_texts: int = 100_000) -> np.ndarray:
    """Boolean per text: does any of its word n-grams occur in `reference` (sorted unique hashes)?"""
    hit = np.zeros(len(texts), dtype=bool)
    for start in range(0, len(texts), chunk_texts):
        index, grams = shingles(texts.slice(start, chunk_texts), ngram)
        hit[start + np.unique(index[np.isin(grams, reference, assume_unique=False)])] = True
    return hit


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) minimising the weighted false-positive and false-negative areas of
    the LSH S-curve around `threshold` (datasketch's criterion, with recall-leaning weights)."""
    grid = np.linspace(0.0, 1.0, 2001)

    def candidate_probability(b: int, r: int) -> np.ndarray:
        return 1.0 - (1.0 - grid**r) ** b

    best, best_error = (1, num_perm), math.inf
    for b in range(1, num_perm + 1):
        r = num_perm // b
        p = candidate_probability(b, r)
        below, above = grid <= threshold, grid >= threshold
        error = (FALSE_POSITIVE_WEIGHT * np.trapezoid(p[below], grid[below])
                 + FALSE_NEGATIVE_WEIGHT * np.trapezoid(1.0 - p[above], grid[above]))
        if error < best_error:
            best, best_error = (b, r), error
    return best


def clusters(signatures: np.ndarray, threshold: float) -> np.ndarray:
    """Cluster label per text (the smallest member index). Texts sharing an LSH band become a
    candidate pair with their band group's first member; a pair is kept only if the signatures
    agree on at least `threshold` of the permutations (estimated Jaccard), which removes most LSH
    false positives before the connected components are taken."""
    n, num_perm = signatures.shape
    bands, rows = lsh_bands(threshold, num_perm)
    sources, targets = [], []
    for band in range(bands):
        block = np.ascontiguousarray(signatures[:, band * rows:(band + 1) * rows])
        _, first_index, group = np.unique(block.view(np.dtype((np.void, block.dtype.itemsize * rows))).ravel(),
                                          return_index=True, return_inverse=True)
        representative = first_index[group]
        candidate = np.flatnonzero(representative != np.arange(n))
        if not len(candidate):
            continue
        agreement = (signatures[candidate] == signatures[representative[candidate]]).mean(axis=1)
        keep = candidate[agreement >= threshold]
        sources.append(keep)
        targets.append(representative[keep])
    if not sources:
        return np.arange(n)
    return components(n, np.concatenate(sources), np.concatenate(targets))


def components(n: int, sources: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Connected components of the undirected graph on n nodes with the given edges, each node
    labelled by its component's smallest member (independent of scipy's numbering)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(sources), dtype=np.int8), (sources, targets)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    smallest = np.full(component.max() + 1, n, dtype=np.int64)
    np.minimum.at(smallest, component, np.arange(n))
    return smallest[component]
