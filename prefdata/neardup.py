"""Near-duplicate prompt clusters: comparison text, stable shingle hashes, MinHash (rensa), LSH.

How two prompts are compared (docs/curate.md, "Near-duplicate prompts"):
  * comparison text: the folded prompt (curate's NFKC + case fold + collapsed whitespace) without
    its role tags, with contractions expanded ("what's" → "what is", "don't" → "do not") and
    punctuation removed; used for the comparison only, records are written unchanged;
  * short prompts (≤ SHORT_MAX_WORDS words) are sets of word 1- and 2-grams, compared against a
    threshold that follows their length: the Jaccard one changed word (under 12 words) or two
    changed words leave, never below SHORT_THRESHOLD_FLOOR. A fixed threshold cannot work
    there: one changed word of five removes 3 of 9 shingles (Jaccard 0.5), of fifty 3 of 99.
    Prompts of up to TINY_MAX_WORDS words are held to the configured threshold instead: there one
    changed word is the request itself ("hi" / "thanks", "tell me a joke" / "a story");
  * long prompts (≥ LONG_MIN_WORDS words) are sets of word `ngram`-grams against the configured
    threshold, as before. Prompts in between are in both; their edges are unioned, so a pair
    whose lengths differ by a few words is always compared in one scheme.

Every hash that decides a cluster is fixed here, independent of library versions: words are
xxh64(UTF-8, seed WORD_HASH_SEED), n-grams roll word hashes with _MIX in uint64, and MinHash is
rensa's R-MinHash over those integers (rensa hashes only the integers we give it; its sketch is
pinned by RENSA_ALGORITHM, checked at import, and by the exact version in pyproject.toml).
LSH bands are grouped exactly (a polars group-by on the band's columns), candidates pass a loose
filter on the estimated Jaccard and are then verified on their exact shingle sets (a fixed threshold needs no room for the
estimate's noise, which at 128 permutations is as wide as the gap between a two-word edit and a
template's variable part), and clusters are the connected components (`scipy.sparse.csgraph`).

Signatures are read through a column reader, a band at a time, and candidate pairs are verified a
block at a time, so curate can keep the signatures on disk (`SignatureFile`) and the texts in a
spill file: `scheme_edges` is the one code path for both, `prompt_clusters` its in-memory use.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable

import numpy as np
import polars as pl
import rensa
import xxhash

_MIX = np.uint64(0x9E3779B97F4A7C15)  # golden-ratio constant: rolls word hashes into an n-gram hash
WORD_HASH_SEED = 0
# rensa 0.5 changed its sketch (algorithm version 2) and says old digests must not be compared
# with new ones; a different algorithm would silently move clusters and the split, so refuse it.
RENSA_ALGORITHM = 2
if rensa.RMinHash.ALGORITHM_VERSION != RENSA_ALGORITHM:
    raise ImportError(f"prefdata needs rensa's R-MinHash algorithm version {RENSA_ALGORITHM} (rensa==0.5.0), "
                      f"found {rensa.RMinHash.ALGORITHM_VERSION}; reinstall prefdata's pinned dependencies")

# Word 5-grams need ~150 words before two changed words leave a Jaccard clear of 0.8 and of the
# estimate's noise (one changed word removes 5 shingles); below that the 1+2-gram scheme decides.
SHORT_MAX_WORDS = 150
LONG_MIN_WORDS = 120  # overlap: prompts of 120–150 words are compared in both schemes
TWO_EDITS_FROM_WORDS = 12  # below this, two changed words are as much as a template's variable part
# One changed word is the whole request of a one- to four-word prompt ("hi" / "thanks", "continue" /
# "stop", "tell me a joke" / "tell me a story"): these get no edit allowance, only --threshold, so
# what merges them is folding (case, punctuation, contractions, whitespace).
TINY_MAX_WORDS = 4
# The least a short prompt's threshold can be: what one changed word leaves in a five-word prompt
# ((9 − 3) / (9 + 3)), the shortest the one-edit rule is meant for. It binds on texts whose repeated
# words shrink the shingle set ("the the the the the"), which would otherwise come out at 0, match
# every prompt, and lay the LSH out as 128 one-row bands (0.5 gives 32 bands of 4 rows).
SHORT_THRESHOLD_FLOOR = 0.5
PREFILTER_SIGMAS = 3.0  # MinHash only preselects: a true pair at the threshold passes with 99.9%


# ---------------------------------------------------------------------------------------------
# Comparison text and stable hashes

ROLE_TAG = r"(^|\n)(system|user|assistant): "  # how curate's normalised messages start each turn

_CONTRACTIONS = [  # applied in order: irregular forms before the generic suffixes
    (r"\bwon't\b", "will not"), (r"\bcan't\b", "can not"), (r"\bcannot\b", "can not"), (r"\bshan't\b", "shall not"),
    (r"\bain't\b", "is not"), (r"\blet's\b", "let us"), (r"(\w)n't\b", "${1} not"), (r"(\w)'re\b", "${1} are"),
    (r"(\w)'ve\b", "${1} have"), (r"(\w)'ll\b", "${1} will"), (r"(\w)'m\b", "${1} am"), (r"(\w)'d\b", "${1} would"),
    (r"(\w)'s\b", "${1} is"),  # possessives too: both sides of a comparison get the same rewrite
]


def strip_roles(texts: pl.Series) -> pl.Series:
    """Curate's normalised messages without their role tags: a prompt's words are what it asks,
    and a role word would make every one-word prompt share a third of its shingles."""
    return texts.str.replace_all(ROLE_TAG, " ").str.replace_all(r"\s+", " ").str.strip_chars()


def comparison_text(folded: pl.Series) -> pl.Series:
    """The text near-duplicates are judged on: role tags dropped, contractions expanded,
    punctuation (Unicode class P) removed, single spaces. Symbols stay ("2+2" is not "2-2").
    Input is already case-folded."""
    text = strip_roles(folded.fill_null("")).str.replace_all(r"[’‘ʼ`]", "'")
    for pattern, replacement in _CONTRACTIONS:
        text = text.str.replace_all(pattern, replacement)
    return text.str.replace_all(r"\p{P}+", " ").str.replace_all(r"\s+", " ").str.strip_chars()


def word_hashes(words: pl.Series) -> np.ndarray:
    """xxh64 of each word's UTF-8 bytes with seed WORD_HASH_SEED, as uint64. Each distinct word is
    hashed once (in Python; a batch has far fewer distinct words than words) and joined back."""
    distinct = words.unique()
    hashes = np.fromiter((xxhash.xxh64_intdigest(w.encode(), WORD_HASH_SEED) for w in distinct.to_list()),
                         dtype=np.uint64, count=len(distinct))
    table = pl.DataFrame({"w": distinct, "h": pl.Series(hashes, dtype=pl.UInt64)})
    return words.to_frame("w").join(table, on="w", how="left", maintain_order="left")["h"].to_numpy()


def _ngram_hashes(lengths: np.ndarray, hashes: np.ndarray, ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """(text index, n-gram hash) for every word `ngram`-gram; a text shorter than `ngram` words
    gives one shingle of all its words, so every text has at least one."""
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    per_text = np.maximum(lengths - ngram + 1, 1)
    text_index = np.repeat(np.arange(len(lengths)), per_text)
    first_of_text = np.repeat(np.cumsum(per_text) - per_text, per_text)
    starts = offsets[text_index] + (np.arange(per_text.sum()) - first_of_text)
    width = np.minimum(lengths, ngram)[text_index]
    acc = np.zeros(len(text_index), dtype=np.uint64)
    for k in range(ngram):
        valid = k < width
        acc = np.where(valid, acc * _MIX + hashes[np.where(valid, starts + k, 0)], acc)
    return text_index, acc


def _words(texts: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    words = texts.fill_null("").str.split(" ")
    return words.list.len().to_numpy().astype(np.int64), word_hashes(words.explode())


def shingles(texts: pl.Series, ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """(text index, shingle hash) for every word `ngram`-gram of every text, grouped by text in
    order. Texts must already be normalised with single spaces."""
    return _ngram_hashes(*_words(texts), ngram)


def short_shingles(texts: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """(text index, shingle hash) for the word 1- and 2-grams of every text, grouped by text: one
    changed word touches 3 shingles instead of 5, and word order still counts through the 2-grams."""
    lengths, hashes = _words(texts)
    uni_index, uni = _ngram_hashes(lengths, hashes, 1)
    bi_index, bi = _ngram_hashes(lengths, hashes, 2)
    # Each text's 1-grams then its 2-grams, placed directly (a sort would cost more than the rest).
    per_text = lengths + np.maximum(lengths - 1, 1)
    text_start = np.cumsum(per_text) - per_text
    uni_start, bi_start = np.cumsum(lengths) - lengths, np.cumsum(np.maximum(lengths - 1, 1)) - np.maximum(lengths - 1, 1)
    out = np.empty(per_text.sum(), dtype=np.uint64)
    out[text_start[uni_index] + np.arange(len(uni)) - uni_start[uni_index]] = uni
    out[text_start[bi_index] + lengths[bi_index] + np.arange(len(bi)) - bi_start[bi_index]] = bi
    return np.repeat(np.arange(len(lengths)), per_text), out


def shares_shingle(texts: pl.Series, ngram: int, reference: np.ndarray, chunk_texts: int = 100_000) -> np.ndarray:
    """Boolean per text: does any of its word n-grams occur in `reference` (sorted unique hashes)?"""
    hit = np.zeros(len(texts), dtype=bool)
    for start in range(0, len(texts), chunk_texts):
        index, grams = shingles(texts.slice(start, chunk_texts), ngram)
        hit[start + np.unique(index[np.isin(grams, reference, assume_unique=False)])] = True
    return hit


# ---------------------------------------------------------------------------------------------
# MinHash and LSH


def minhash(text_index: np.ndarray, shingle_hashes: np.ndarray, n_texts: int, num_perm: int, seed: int) -> np.ndarray:
    """[n_texts, num_perm] uint32 signatures: rensa's R-MinHash of each text's shingle hashes.
    Measured 5–30× faster than the numpy multiply-shift MinHash this replaced (benchmarks/bench_neardup.py);
    most of its time is copying the digest matrix out as Python lists, which rensa 0.5 requires."""
    if n_texts == 0:
        return np.empty((0, num_perm), dtype=np.uint32)
    offsets = np.searchsorted(text_index, np.arange(n_texts + 1)).astype(np.uint64)
    matrix = rensa.RMinHash.digest_matrix_from_flat_token_hashes(np.ascontiguousarray(shingle_hashes, dtype=np.uint64),
                                                                 offsets, num_perm, seed)
    # fromiter over the flattened rows skips np.array's shape discovery on nested lists.
    flat = itertools.chain.from_iterable(matrix.to_rows())
    return np.fromiter(flat, dtype=np.uint32, count=n_texts * num_perm).reshape(n_texts, num_perm)


def signatures(texts: pl.Series, shingler, num_perm: int, seed: int, chunk_texts: int = 50_000) -> np.ndarray:
    """[len(texts), num_perm] signatures of `shingler(texts)` (a (text index, hash) function),
    a chunk of texts at a time so the shingle arrays never exist for the whole input at once."""
    out = np.empty((len(texts), num_perm), dtype=np.uint32)
    for start in range(0, len(texts), chunk_texts):
        chunk = texts.slice(start, chunk_texts)
        index, grams = shingler(chunk)
        out[start:start + len(chunk)] = minhash(index, grams, len(chunk), num_perm, seed)
    return out


# Every LSH candidate is verified against its estimated Jaccard, so a false positive costs only a
# comparison while a false negative loses a duplicate: the band layout is tuned for recall.
FALSE_POSITIVE_WEIGHT, FALSE_NEGATIVE_WEIGHT = 0.1, 0.9


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


def short_thresholds(n_words: np.ndarray, set_size: np.ndarray, threshold: float) -> np.ndarray:
    """Jaccard threshold for word 1+2-gram sets of `set_size` distinct shingles: the Jaccard left
    by e scattered changed words, each swapping 3 shingles ((s−3e)/(s+3e)), e = 1 under
    TWO_EDITS_FROM_WORDS words and 2 from there, never below SHORT_THRESHOLD_FLOOR nor above the
    configured `threshold`; prompts of up to TINY_MAX_WORDS words get `threshold` itself.
    Inserted, deleted or adjacent changed words swap fewer shingles and stay above it."""
    size = np.maximum(set_size, 1).astype(np.float64)
    edits = np.where(n_words < TWO_EDITS_FROM_WORDS, 1, 2)
    allowance = np.clip((size - 3 * edits) / (size + 3 * edits), SHORT_THRESHOLD_FLOOR, 1.0)
    return np.minimum(threshold, np.where(n_words <= TINY_MAX_WORDS, 1.0, allowance))


def candidate_pairs(signatures: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (source, target) row pairs worth an exact comparison, for signatures in memory
    (see `candidate_pairs_from`)."""
    return candidate_pairs_from(lambda lo, hi: np.ascontiguousarray(signatures[:, lo:hi]), *signatures.shape, thresholds)


ColumnReader = Callable[[int, int], np.ndarray]  # (lo, hi) → [n, hi − lo] uint32 signature columns


def candidate_pairs_from(columns: ColumnReader, n: int, num_perm: int, thresholds: np.ndarray,
                         pair_block: int = 1_000_000) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (source, target) row pairs worth an exact comparison. Texts sharing an LSH band
    become a candidate pair with their band group's first member; a pair stays if the signatures
    agree on at least the pair's threshold (the larger of the two texts') less PREFILTER_SIGMAS
    standard errors of the estimate, so the estimate's noise drops almost no true pair. Bands are
    laid out for the smallest threshold present.

    Signatures are read through `columns`, a band of columns at a time, so they can stay on disk
    (curate at ten million prompts: 5 GB of signatures). The prefilter is a property of the pair,
    not of the band that proposed it, so it runs once on the distinct pairs of all bands."""
    bands, rows = lsh_bands(float(thresholds.min()), num_perm)
    codes = [np.empty(0, np.int64)]  # pair (s, t) as s·n + t: one int64 sorts and dedupes faster than rows
    pending = 0
    for band in range(bands):
        representative = _band_representatives(columns(band * rows, (band + 1) * rows))
        candidate = np.flatnonzero(representative != np.arange(n))
        codes.append(candidate.astype(np.int64) * n + representative[candidate])
        pending += len(candidate)
        if pending > 4 * n:  # identical prompts repeat the same pair in every band: dedupe as we go
            codes, pending = [np.unique(np.concatenate(codes))], 0
    pairs = np.unique(np.concatenate(codes))
    sources, targets = pairs // n, pairs % n
    agree = np.zeros(len(pairs), np.int64)
    for lo in range(0, num_perm, rows):
        block = columns(lo, min(lo + rows, num_perm))
        for p in range(0, len(pairs), pair_block):
            agree[p:p + pair_block] += (block[sources[p:p + pair_block]] == block[targets[p:p + pair_block]]).sum(axis=1)
    keep = passes_prefilter(agree, thresholds[sources], thresholds[targets], num_perm)
    return sources[keep], targets[keep]


def passes_prefilter(agree: np.ndarray, source_threshold: np.ndarray, target_threshold: np.ndarray, num_perm: int) -> np.ndarray:
    """Per candidate pair whose signatures agree in `agree` of `num_perm` places: is the estimate
    within PREFILTER_SIGMAS standard errors of the pair's threshold (the larger of its two texts')?"""
    needed = np.maximum(source_threshold, target_threshold)
    needed -= PREFILTER_SIGMAS * np.sqrt(needed * (1 - needed) / num_perm)
    return agree / num_perm >= needed


def _band_representatives(block: np.ndarray) -> np.ndarray:
    """For each row of a [n, rows] band, the first row with the same band values.

    Rows are grouped by a 64-bit mix of their values (one column to group instead of `rows`:
    a third of the memory at ten million prompts), then every row is checked against its
    group's first row; groups where a collision put different values together are regrouped
    exactly. The result is exact either way."""
    n = len(block)
    if not n:
        return np.empty(0, np.int64)
    key = _band_hash(block)
    representative = pl.DataFrame({"k": key}).with_row_index("i").select(pl.col("i").first().over("k"))["i"].to_numpy().astype(np.int64)
    mismatch = np.zeros(n, bool)
    for c in range(block.shape[1]):
        mismatch |= block[representative, c] != block[:, c]
    if mismatch.any():
        rows = np.flatnonzero(np.isin(key, np.unique(key[mismatch])))
        sub = np.ascontiguousarray(block[rows])
        _, first_index, group = np.unique(sub.view(np.dtype((np.void, sub.dtype.itemsize * sub.shape[1]))).ravel(),
                                          return_index=True, return_inverse=True)
        representative[rows] = rows[first_index[group.ravel()]]
    return representative


def _band_hash(block: np.ndarray) -> np.ndarray:
    """Multiply-xor mix of a band's columns into one uint64 (only groups rows; never decides)."""
    key = np.zeros(len(block), np.uint64)
    for c in range(block.shape[1]):
        key = (key ^ block[:, c].astype(np.uint64)) * _MIX
    return key


def exact_jaccard(texts: pl.Series, shingler, sources: np.ndarray, targets: np.ndarray,
                  chunk_pairs: int = 200_000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Jaccard, source set size, target set size) of the exact shingle sets of each pair of
    `texts`. Only texts in some pair are shingled again: after the prefilter, about the duplicates."""
    if not len(sources):
        return np.empty(0), np.empty(0, np.int64), np.empty(0, np.int64)
    involved, local = np.unique(np.r_[sources, targets], return_inverse=True)
    index, grams = shingler(texts.gather(involved))
    order = np.lexsort((grams, index))
    index, grams = index[order], grams[order]
    distinct = np.r_[True, (index[1:] != index[:-1]) | (grams[1:] != grams[:-1])]
    index, grams = index[distinct], grams[distinct]
    sizes = np.bincount(index, minlength=len(involved))
    starts = np.cumsum(sizes) - sizes
    a_all, b_all = local[:len(sources)], local[len(sources):]
    jaccard = np.empty(len(sources))
    for lo in range(0, len(sources), chunk_pairs):
        a, b = a_all[lo:lo + chunk_pairs], b_all[lo:lo + chunk_pairs]
        pair = np.r_[np.repeat(np.arange(len(a)), sizes[a]), np.repeat(np.arange(len(b)), sizes[b])]
        gram = grams[np.r_[_ranges(starts[a], sizes[a]), _ranges(starts[b], sizes[b])]]
        order = np.lexsort((gram, pair))
        pair, gram = pair[order], gram[order]
        shared = np.bincount(pair[1:][(pair[1:] == pair[:-1]) & (gram[1:] == gram[:-1])], minlength=len(a))
        jaccard[lo:lo + len(a)] = shared / (sizes[a] + sizes[b] - shared)
    return jaccard, sizes[a_all], sizes[b_all]


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(start, start + length) for each pair, vectorised."""
    offsets = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return offsets + np.arange(lengths.sum())


def prompt_clusters(folded: pl.Series, ngram: int, threshold: float, num_perm: int, seed: int) -> np.ndarray:
    """Cluster label per text (its cluster's smallest index) for curate-folded prompt texts."""
    text = comparison_text(folded)
    n_words, size_estimate = text_sizes(text)
    sources, targets = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for kind, members in scheme_members(n_words):
        if len(members) < 2:
            continue
        subset = text.gather(members)
        sig = signatures(subset, scheme_shingler(kind, ngram), num_perm, seed)
        s, t = scheme_edges(kind, members, lambda lo, hi, sig=sig: np.ascontiguousarray(sig[:, lo:hi]), subset.gather,
                            n_words, size_estimate, ngram, threshold, num_perm)
        sources.append(s)
        targets.append(t)
    return components(len(folded), np.concatenate(sources), np.concatenate(targets))


def text_sizes(text: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """(word count, shingle-set size estimate) of comparison texts. The estimate (distinct words +
    (n−1) 2-grams, nearly always distinct) only sets the prefilter; exact sizes decide the final threshold."""
    words = text.str.split(" ")
    n_words = words.list.len().to_numpy().astype(np.int64)
    return n_words, words.list.n_unique().to_numpy().astype(np.int64) + n_words - 1


SCHEMES = ("short", "long")


def scheme_members(n_words: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """(scheme, ascending text indices compared in it): short prompts by word 1+2-grams, long ones
    by word n-grams, the overlap in both."""
    return [("short", np.flatnonzero(n_words <= SHORT_MAX_WORDS)), ("long", np.flatnonzero(n_words >= LONG_MIN_WORDS))]


def scheme_shingler(kind: str, ngram: int) -> Callable[[pl.Series], tuple[np.ndarray, np.ndarray]]:
    return short_shingles if kind == "short" else lambda t: shingles(t, ngram)


def scheme_thresholds(kind: str, n_words: np.ndarray, sizes: np.ndarray, threshold: float) -> np.ndarray:
    return short_thresholds(n_words, sizes, threshold) if kind == "short" else np.full(len(n_words), threshold)


def scheme_edges(kind: str, members: np.ndarray, columns: ColumnReader, texts: Callable[[np.ndarray], pl.Series],
                 n_words: np.ndarray, size_estimate: np.ndarray, ngram: int, threshold: float, num_perm: int,
                 chunk_pairs: int = 200_000) -> tuple[np.ndarray, np.ndarray]:
    """Verified near-duplicate edges (text indices) among `members` under one scheme.

    `columns` reads the members' signatures (member order) a band at a time and `texts(positions)`
    gives the comparison texts of members at ascending positions: in memory for `prompt_clusters`,
    from disk for curate. Pairs are verified `chunk_pairs` at a time, so only their texts' exact
    shingle sets exist at once."""
    if len(members) < 2:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    thresholds = scheme_thresholds(kind, n_words[members], size_estimate[members], threshold)
    s_all, t_all = candidate_pairs_from(columns, len(members), num_perm, thresholds)
    return verified_edges(kind, members, s_all, t_all, texts, n_words, ngram, threshold, chunk_pairs)


def verified_edges(kind: str, members: np.ndarray, s_all: np.ndarray, t_all: np.ndarray, texts: Callable[[np.ndarray], pl.Series],
                   n_words: np.ndarray, ngram: int, threshold: float, chunk_pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """The candidate pairs (positions in `members`) whose exact shingle sets reach the scheme's
    threshold, as text indices; `texts(positions)` as for `scheme_edges`."""
    shingler = scheme_shingler(kind, ngram)
    sources, targets = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for lo in range(0, len(s_all), chunk_pairs):
        s, t = s_all[lo:lo + chunk_pairs], t_all[lo:lo + chunk_pairs]
        involved, local = np.unique(np.r_[s, t], return_inverse=True)
        jaccard, size_s, size_t = exact_jaccard(texts(involved), shingler, local[:len(s)], local[len(s):])
        # The pair's threshold: the longer text's edit allowance on the larger set (stricter of the two).
        longer = np.where(n_words[members[s]] >= n_words[members[t]], members[s], members[t])
        keep = jaccard >= scheme_thresholds(kind, n_words[longer], np.maximum(size_s, size_t), threshold) - 1e-9
        sources.append(members[s[keep]])
        targets.append(members[t[keep]])
    return np.concatenate(sources), np.concatenate(targets)


class SignatureFile:
    """[n, num_perm] uint32 signatures on disk, appended a block of texts at a time. Each block is
    stored column-major, so a band of columns is one contiguous read per block and memory holds
    one band, never the matrix (10M prompts × 128 permutations = 5 GB)."""

    def __init__(self, path, num_perm: int) -> None:
        self._file = open(path, "w+b")  # noqa: SIM115 - closed by close()
        self.num_perm = num_perm
        self._blocks: list[tuple[int, int]] = []  # (byte offset, rows)
        self._end = 0

    def __len__(self) -> int:
        return sum(rows for _, rows in self._blocks)

    def append(self, signatures: np.ndarray) -> None:
        if not len(signatures):
            return
        data = np.ascontiguousarray(signatures.T, dtype=np.uint32).tobytes()
        os.pwrite(self._file.fileno(), data, self._end)
        self._blocks.append((self._end, len(signatures)))
        self._end += len(data)

    def columns(self, lo: int, hi: int, position: np.ndarray | None = None) -> np.ndarray:
        """Columns lo:hi of every stored row; row i goes to `position[i]` when given (a
        permutation), so a reordered band costs no second copy."""
        out = np.empty((len(self), hi - lo), np.uint32)
        start = 0
        for offset, rows in self._blocks:
            raw = os.pread(self._file.fileno(), (hi - lo) * rows * 4, offset + lo * rows * 4)
            target = slice(start, start + rows) if position is None else position[start:start + rows]
            out[target] = np.frombuffer(raw, np.uint32).reshape(hi - lo, rows).T
            start += rows
        return out

    def close(self) -> None:
        self._file.close()


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
