"""Near-duplicate prompt quality and speed: prefdata vs datasketch vs rensa (issue 15).

    .venv/bin/python benchmarks/bench_neardup.py [--speed-rows 100000] [--json bench_neardup.json]

Quality, on two labelled sets, scored as pairwise precision and recall:
  generated  the labelled set of tests/test_neardup.py (one- to four-word chat prompts, short, long
             and templated prompts with known duplicate groups), plus the fraction of same-template
             prompt pairs merged; its groups follow the edits that built it;
  reviewed   tests/fixtures/neardup/reviewed_pairs.jsonl: chat-style prompt pairs, each labelled by a
             reader (is one prompt redundant beside the other: the same request?), independently of
             any method's rule: paraphrases that are duplicates, one-word changes that are not.
Every method gets the same text: the prompts as curate folds them (NFKC, case-folded, whitespace
collapsed, "user: " turn prefix), then prefdata's comparison text (role tags dropped, contractions
expanded, punctuation removed), and the same 0.8 threshold. The peers get prefdata's LSH layout for
that threshold (`lsh_bands(0.8, 128)`: 14 bands of 9 rows), with as many permutations as the
bands use (126), since rensa needs bands × rows = permutations.
  prefdata             prefdata.neardup.prompt_clusters, the curate defaults (ngram 5, threshold 0.8, 128 perms)
  prefdata (previous)  word 5-grams, numpy multiply-shift MinHash, LSH, estimated Jaccard ≥ 0.8: the code
                       this replaced
  datasketch           MinHash of the words, MinHashLSH(threshold=0.8, params=(14, 9)): every LSH
                       candidate is a duplicate (its README's usage)
  rensa                RMinHash(seed=42) of the words, RMinHashLSH(0.8, num_bands=14), candidates kept
                       when the estimated Jaccard ≥ 0.8 (its deduplicator's rule)
Clusters are the connected components of the duplicate pairs in every case.

Speed: MinHash signatures of the same shingle hashes (synthetic prompts of 10–60 words), numpy
(the previous code, two threads) vs rensa, 128 permutations; and prompt_clusters end to end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prefdata.neardup import (  # noqa: E402
    comparison_text,
    components,
    lsh_bands,
    minhash,
    prompt_clusters,
    shingles,
    short_shingles,
)
from tests.test_neardup import TEMPLATES, fold_as_curate, labelled_set, pair_scores  # noqa: E402

NUM_PERM, THRESHOLD = 128, 0.8
# The peers' LSH: prefdata's layout for the threshold, every permutation in a band.
PEER_BANDS, PEER_ROWS = lsh_bands(THRESHOLD, NUM_PERM)
PEER_PERM = PEER_BANDS * PEER_ROWS
REVIEWED_PAIRS = ROOT / "tests" / "fixtures" / "neardup" / "reviewed_pairs.jsonl"


# ---------------------------------------------------------------------------------------------
# The previous prefdata code (numpy MinHash), kept here as the measured baseline


def numpy_minhash(text_index: np.ndarray, hashes: np.ndarray, n_texts: int, num_perm: int = NUM_PERM, seed: int = 0) -> np.ndarray:
    """The multiply-shift MinHash prefdata used before rensa: ((a·x + b) mod 2^64) >> 32 per
    permutation, blocks ending on text boundaries, two threads."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) | np.uint64(1)
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    text_starts = np.flatnonzero(np.r_[True, text_index[1:] != text_index[:-1]])
    out = np.empty((n_texts, num_perm), dtype=np.uint32)
    block = 1 << 18
    ends = np.searchsorted(text_starts, np.arange(block, len(text_index), block), side="right")
    blocks = [(f, last) for f, last in zip(np.r_[0, ends], np.r_[ends, len(text_starts)]) if f < last]

    def sign(span: tuple[int, int]) -> None:
        first, last = span
        lo, hi = text_starts[first], text_starts[last] if last < len(text_starts) else len(text_index)
        hashed = np.empty((hi - lo, num_perm), dtype=np.uint64)
        np.multiply(hashes[lo:hi, None], a[None, :], out=hashed)
        hashed += b
        hashed >>= np.uint64(32)
        out[first:last] = np.minimum.reduceat(hashed, text_starts[first:last] - lo, axis=0)

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(sign, blocks))
    return out


def previous_labels(folded: pl.Series) -> np.ndarray:
    """Word 5-grams, numpy MinHash, LSH, each candidate kept if the estimated Jaccard ≥ 0.8."""
    index, grams = shingles(folded, 5)
    sig = numpy_minhash(index, grams, len(folded))
    bands, rows = lsh_bands(THRESHOLD, NUM_PERM)
    sources, targets = [], []
    for band in range(bands):
        block = np.ascontiguousarray(sig[:, band * rows:(band + 1) * rows])
        _, first, group = np.unique(block.view(np.dtype((np.void, 4 * rows))).ravel(), return_index=True, return_inverse=True)
        rep = first[group.ravel()]
        cand = np.flatnonzero(rep != np.arange(len(folded)))
        keep = cand[(sig[cand] == sig[rep[cand]]).mean(axis=1) >= THRESHOLD]
        sources.append(keep)
        targets.append(rep[keep])
    return components(len(folded), np.concatenate(sources), np.concatenate(targets))


# ---------------------------------------------------------------------------------------------
# The libraries at their usual settings


def datasketch_labels(folded: pl.Series) -> np.ndarray:
    from datasketch import MinHash, MinHashLSH

    lsh, sketches = MinHashLSH(threshold=THRESHOLD, num_perm=PEER_PERM, params=(PEER_BANDS, PEER_ROWS)), []
    for i, text in enumerate(comparison_text(folded).to_list()):
        sketch = MinHash(num_perm=PEER_PERM)
        sketch.update_batch([w.encode() for w in text.split()])
        lsh.insert(i, sketch)
        sketches.append(sketch)
    pairs = [(i, j) for i, s in enumerate(sketches) for j in lsh.query(s) if j != i]
    return _components_of(len(folded), pairs)


def rensa_labels(folded: pl.Series) -> np.ndarray:
    from rensa import RMinHash, RMinHashLSH

    lsh, sketches = RMinHashLSH(threshold=THRESHOLD, num_perm=PEER_PERM, num_bands=PEER_BANDS), []
    for i, text in enumerate(comparison_text(folded).to_list()):
        sketch = RMinHash(num_perm=PEER_PERM, seed=42)
        sketch.update(text.split())
        lsh.insert(i, sketch)
        sketches.append(sketch)
    pairs = [(i, j) for i, s in enumerate(sketches) for j in lsh.query(s) if j != i and s.jaccard(sketches[j]) >= THRESHOLD]
    return _components_of(len(folded), pairs)


def _components_of(n: int, pairs: list[tuple[int, int]]) -> np.ndarray:
    edges = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    return components(n, edges[:, 0], edges[:, 1])


METHODS = {
    "prefdata": lambda folded: prompt_clusters(folded, 5, THRESHOLD, NUM_PERM, 0),
    "prefdata (previous)": previous_labels,
    "datasketch": datasketch_labels,
    "rensa": rensa_labels,
}


def template_merge_rate(labels: np.ndarray, kinds: list[str]) -> float:
    """Fraction of same-template prompt pairs put in one cluster (each should be its own)."""
    merged = total = 0
    for t in range(len(TEMPLATES)):
        members = labels[[i for i, k in enumerate(kinds) if k == f"template:{t}"]]
        same = members[:, None] == members[None, :]
        merged += (same.sum() - len(members)) // 2
        total += len(members) * (len(members) - 1) // 2
    return merged / total


def reviewed_pairs() -> list[dict]:
    """The reader-labelled pairs: {"a", "b", "duplicate", "why"} per line."""
    return [json.loads(line) for line in REVIEWED_PAIRS.read_text().splitlines() if line.strip()]


def reviewed_scores(labels_of, pairs: list[dict]) -> tuple[float, float]:
    """Precision and recall of `labels_of` (folded texts → cluster labels) on the labelled pairs,
    all texts clustered together as curate would see them."""
    texts = sorted({text for pair in pairs for text in (pair["a"], pair["b"])})
    label = dict(zip(texts, labels_of(fold_as_curate(texts))))
    merged = np.array([label[pair["a"]] == label[pair["b"]] for pair in pairs])
    duplicate = np.array([pair["duplicate"] for pair in pairs])
    return (merged & duplicate).sum() / max(merged.sum(), 1), (merged & duplicate).sum() / max(duplicate.sum(), 1)


def quality() -> list[dict]:
    data, pairs = labelled_set(), reviewed_pairs()
    folded, truth = fold_as_curate(data.texts), np.array(data.group)
    rows = []
    for name, method in METHODS.items():
        start = time.perf_counter()
        labels = method(folded)
        seconds = time.perf_counter() - start
        precision, recall = pair_scores(labels, truth)
        reviewed_precision, reviewed_recall = reviewed_scores(method, pairs)
        rows.append({"method": name, "texts": len(folded), "precision": float(precision), "recall": float(recall),
                     "template_pairs_merged": template_merge_rate(labels, data.kind), "seconds": seconds,
                     "reviewed_pairs": len(pairs), "reviewed_precision": float(reviewed_precision),
                     "reviewed_recall": float(reviewed_recall)})
    return rows


# ---------------------------------------------------------------------------------------------
# Speed on synthetic prompts


def synthetic_prompts(n: int, seed: int = 0) -> pl.Series:
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(20_000)])
    lengths = rng.integers(10, 61, n)
    words = vocab[rng.integers(0, len(vocab), lengths.sum())]
    cuts = np.cumsum(lengths)[:-1]
    return pl.Series([" ".join(w) for w in np.split(words, cuts)])


def speed(rows: int) -> list[dict]:
    texts = fold_as_curate(synthetic_prompts(rows).to_list())
    out = []
    for scheme, shingler in (("word 5-grams", lambda t: shingles(t, 5)), ("word 1+2-grams", short_shingles)):
        index, grams = shingler(texts)
        for name, sign in (("numpy (previous)", numpy_minhash), ("rensa", lambda i, g, n: minhash(i, g, n, NUM_PERM, 0))):
            start = time.perf_counter()
            sign(index, grams, len(texts))
            out.append({"step": f"MinHash signatures, {scheme}", "method": name, "texts": rows, "shingles": len(grams),
                        "seconds": time.perf_counter() - start})
    start = time.perf_counter()
    prompt_clusters(texts, 5, THRESHOLD, NUM_PERM, 0)
    out.append({"step": "prompt_clusters end to end", "method": "prefdata", "texts": rows, "shingles": None,
                "seconds": time.perf_counter() - start})
    return out


def run(speed_rows: int = 100_000) -> dict:
    """What run_all (or anyone) calls: {"quality": [...], "speed": [...]}."""
    return {"quality": quality(), "speed": speed(speed_rows)}


def markdown(report: dict) -> str:
    lines = ["| near-dup method | generated set: precision | recall | template pairs merged | seconds "
             "| reviewed pairs: precision | recall |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["quality"]:
        lines.append(f"| {r['method']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['template_pairs_merged']:.1%} "
                     f"| {r['seconds']:.2f} | {r['reviewed_precision']:.3f} | {r['reviewed_recall']:.3f} |")
    lines += ["", "| step | method | texts | shingles | seconds |", "|---|---|---:|---:|---:|"]
    for r in report["speed"]:
        shingle_count = f"{r['shingles']:,}" if r["shingles"] is not None else "—"
        lines.append(f"| {r['step']} | {r['method']} | {r['texts']:,} | {shingle_count} | {r['seconds']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speed-rows", type=int, default=100_000)
    parser.add_argument("--json", type=Path, default=Path("bench_neardup.json"))
    args = parser.parse_args()
    report = run(args.speed_rows)
    args.json.write_text(json.dumps(report, indent=2))
    print(markdown(report))


if __name__ == "__main__":
    main()
