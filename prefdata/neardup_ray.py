"""Near-duplicate prompt clusters across a Ray cluster (curate --engine ray; docs/cluster.md).

The clusters are those of curate's local path (prefdata.curate._near_duplicate_nodes): the same
comparison texts, signatures, LSH band layout, candidate pairs, prefilter and exact verification
(the functions of prefdata.neardup), so the same edges and the same connected components. What
changes is where each step runs; no process holds every signature or every edge:

  1. blocks: the distinct prompts' texts, one block per spill batch (a contiguous range of
     nodes), go to the object store; a task per block computes each scheme's MinHash signatures
     there and keeps them in the block; only the per-text sizes (word count, shingle-set size
     estimate) come back here, since the band layout depends on the smallest threshold of all;
  2. shuffle: a task per block and scheme cuts each row's signature into the layout's bands and
     sends (band, node, band values) to one of P partitions by a hash of band and values;
  3. a task per partition groups its rows by exact (band, values), a band at a time (its
     memory is one band's rows of the partition, not all of them): every row that is not its
     group's smallest node is a candidate pair with it (candidate_pairs_from's pairs). A slice of
     pairs at a time (half of --chunk-rows), it fetches both texts' signatures and texts from the
     blocks holding them, applies the prefilter and the exact Jaccard check, and keeps its
     verified edges in the object store;
  4. components: min-label propagation over the partitions' edges, each round a task per
     partition proposing for its nodes the smallest label of a neighbour, then pointer jumping
     (label ← label[label]) here, on one label per node, until no label moves. Each node ends
     labelled by its component's smallest member, as `neardup.components` labels it. A pair can
     reach the edge lists from several bands, in several partitions: a repeated edge changes no
     component.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import ray

from prefdata.engine_ray import cluster_cpus, get, remote
from prefdata.neardup import (
    SCHEMES,
    _band_hash,
    _band_representatives,
    lsh_bands,
    passes_prefilter,
    scheme_members,
    scheme_shingler,
    scheme_thresholds,
    signatures,
    text_sizes,
    verified_edges,
)
from prefdata.spill import IpcSpill


def _sign_block(nodes: np.ndarray, text: pa.Array, ngram: int, num_perm: int, seed: int) -> tuple[tuple[np.ndarray, np.ndarray], dict]:
    """(sizes of the block's texts, the block: its nodes, their texts, and each scheme's members
    (block positions) with their signatures). The texts stay an Arrow array: like the numpy
    arrays, Ray maps its buffers from the object store instead of copying them (a polars Series
    is unpickled whole), and every partition's verify task reads the blocks its candidates are in."""
    series = pl.Series(text)
    n_words, size_estimate = text_sizes(series)
    sig = {kind: (members, signatures(series.gather(members), scheme_shingler(kind, ngram), num_perm, seed))
           for kind, members in scheme_members(n_words)}
    return (n_words, size_estimate), {"nodes": nodes, "text": text, "sig": sig}


def _band_pieces(block: dict, kind: str, bands: int, rows: int, partitions: int) -> list[dict[str, np.ndarray]]:
    """The block's rows of one scheme, every band's, split into `partitions` by a hash of (band,
    values): per partition its nodes and their keys, [band, band values] uint32 rows, in band order."""
    members, sig = block["sig"][kind]
    nodes = np.tile(block["nodes"][members], bands)
    keys = np.concatenate([np.column_stack([np.full(len(members), band, np.uint32), sig[:, band * rows:(band + 1) * rows]])
                           for band in range(bands)])
    part = ((_band_hash(keys[:, 1:]) + keys[:, 0].astype(np.uint64)) % np.uint64(partitions)).astype(np.int64)
    order = np.argsort(part, kind="stable")  # by partition, and by band within each
    bounds = np.cumsum(np.bincount(part, minlength=partitions))[:-1]
    return [{"node": n, "key": k} for n, k in zip(np.split(nodes[order], bounds), np.split(keys[order], bounds))]


def _candidates(node: np.ndarray, key: np.ndarray, n_nodes: int) -> np.ndarray:
    """Candidate pairs as codes s · n_nodes + t (distinct): (node, smallest node of its group) for
    every row of an exact key group ([band, band values]) that is not the group's smallest node.
    The grouping is the local path's (`_band_representatives`: each row's first row with the same
    values), over the rows in node order, so a group's first row is its smallest node."""
    order = np.argsort(node)
    node = node[order]
    representative = node[_band_representatives(np.ascontiguousarray(key[order]))]
    candidate = node != representative
    return np.unique(node[candidate] * n_nodes + representative[candidate])


def _partition_edges(kind: str, bands: int, params: dict[str, Any], sizes: tuple[np.ndarray, ...], blocks: list[Any],
                     *pieces: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Verified edges (nodes) among one partition's candidate pairs. Its rows are grouped a band at
    a time (no group spans two bands), so the task copies one band's rows of the partition at
    once; the pieces themselves are read from the object store without a copy. The pairs are then
    checked `chunk_pairs` at a time: the signatures and texts gathered for a check are its slice's,
    not the whole partition's."""
    n_nodes = len(sizes[0])
    starts = [np.searchsorted(piece["key"][:, 0], np.arange(bands + 1, dtype=np.uint32)) for piece in pieces]
    codes = [_candidates(*(np.concatenate([piece[name][at[band]:at[band + 1]] for piece, at in zip(pieces, starts)])
                           for name in ("node", "key")), n_nodes) for band in range(bands)]
    pairs, step = np.unique(np.concatenate(codes)), params["chunk_pairs"]
    edges = [_verified(kind, part // n_nodes, part % n_nodes, params, sizes, blocks)
             for part in (pairs[lo:lo + step] for lo in range(0, len(pairs), step))]
    none = np.empty(0, np.int64)
    return np.concatenate([none, *(s for s, _ in edges)]), np.concatenate([none, *(t for _, t in edges)])


def _verified(kind: str, s: np.ndarray, t: np.ndarray, params: dict[str, Any], sizes: tuple[np.ndarray, ...],
              blocks: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """The candidate pairs (s, t) (nodes) that pass the signature prefilter and the exact check."""
    n_words, size_estimate, block_of, index_in = sizes
    involved, local = np.unique(np.r_[s, t], return_inverse=True)
    ls, lt = local[:len(s)], local[len(s):]
    sig, text = _rows_of(involved, kind, blocks, block_of, index_in)
    threshold, num_perm = params["threshold"], params["num_perm"]
    thresholds = scheme_thresholds(kind, n_words[involved], size_estimate[involved], threshold)
    keep = passes_prefilter((sig[ls] == sig[lt]).sum(axis=1), thresholds[ls], thresholds[lt], num_perm)
    return verified_edges(kind, involved, ls[keep], lt[keep], text.gather, n_words, params["ngram"], threshold,
                          params["chunk_pairs"])


def _rows_of(nodes: np.ndarray, kind: str, blocks: list[Any], block_of: np.ndarray,
             index_in: np.ndarray) -> tuple[np.ndarray, pl.Series]:
    """Signatures and texts of `nodes` (all in `kind`), in their order, from the blocks holding
    them (`block_of` each node's block, `index_in` its place there)."""
    which = block_of[nodes]
    places, sigs, texts = [], [], []
    for b in np.unique(which):
        block = ray.get(blocks[b])
        place = np.flatnonzero(which == b)
        local = index_in[nodes[place]]
        members, sig = block["sig"][kind]
        places.append(place)
        sigs.append(sig[np.searchsorted(members, local)])
        texts.append(block["text"].take(pa.array(local)))
    back = np.argsort(np.concatenate(places))
    return np.concatenate(sigs)[back], pl.Series(pa.concat_arrays(texts)).gather(back)


def _proposals(labels: np.ndarray, edges: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(node, smallest label offered to it by these edges) for every node they touch: each edge
    offers each endpoint the other's label, and each endpoint's root (its label) the other's label
    too. Hooking roots, not only nodes, is what makes the rounds few (Shiloach–Vishkin): with nodes
    alone, a chain 0–(n−1)–…–1 took n rounds."""
    s, t = edges
    nodes, offered = np.r_[s, t, labels[s], labels[t]], np.r_[labels[t], labels[s], labels[t], labels[s]]
    order = np.argsort(nodes, kind="stable")
    distinct, starts = np.unique(nodes[order], return_index=True)
    return distinct, np.minimum.reduceat(offered[order], starts) if len(order) else offered


def _next_labels(labels: np.ndarray, proposals: Iterable[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """One round: every node and root takes the smallest label offered, then pointer jumping
    until each label is a root. Labels only fall and stay inside their component, so the rounds
    end at each component's smallest node."""
    moved = labels.copy()
    for nodes, offered in proposals:
        np.minimum.at(moved, nodes, offered)
    while not np.array_equal(jumped := moved[moved], moved):
        moved = jumped
    return moved


def _components(n_nodes: int, edges: list[Any]) -> np.ndarray:
    propose = remote(_proposals)
    labels = np.arange(n_nodes, dtype=np.int64)
    while True:
        shared = ray.put(labels)
        refs = [propose.remote(shared, e) for e in edges]
        # One partition's proposals on the driver at a time, folded as they come.
        moved = _next_labels(labels, (get(ref, "near-duplicate components") for ref in refs))
        if np.array_equal(moved, labels):
            return labels
        labels = moved


def near_duplicate_nodes(node_pos: np.ndarray, n_records: int, prompts: IpcSpill, config: Any) -> np.ndarray:
    """Cluster label per node (its component's smallest node) for the distinct prompts at input
    positions `node_pos` (ascending), whose texts are in the spill `prompts`: what
    prefdata.curate._near_duplicate_nodes returns, computed on the cluster."""
    n_nodes = len(node_pos)
    node_of_pos = np.full(n_records, -1, np.int64)
    node_of_pos[node_pos] = np.arange(n_nodes)
    sign = remote(_sign_block, num_returns=2)
    size_refs, blocks = [], []
    block_of, index_in = np.empty(n_nodes, np.int32), np.empty(n_nodes, np.int64)
    for batch in prompts.batches():
        node = node_of_pos[batch.column("pos").to_numpy()]
        chosen = node >= 0
        if not chosen.any():
            continue
        block_of[node[chosen]], index_in[node[chosen]] = len(blocks), np.arange(chosen.sum())
        sizes, block = sign.remote(node[chosen], batch.column("text").filter(pa.array(chosen)), config.ngram, config.num_perm,
                                   config.seed)
        size_refs.append(sizes)
        blocks.append(block)
    n_words, size_estimate = np.zeros(n_nodes, np.int64), np.zeros(n_nodes, np.int64)
    for b, (words, estimate) in enumerate(get(size_refs, "near-duplicate signatures")):
        n_words[block_of == b], size_estimate[block_of == b] = words[index_in[block_of == b]], estimate[index_in[block_of == b]]
    sizes = ray.put((n_words, size_estimate, block_of, index_in))
    params = {"threshold": config.threshold, "num_perm": config.num_perm, "ngram": config.ngram,
              "chunk_pairs": max(config.chunk_rows // 2, 1)}
    partitions = 2 * cluster_cpus()
    cut, verify, edges = remote(_band_pieces, num_returns=partitions), remote(_partition_edges), []
    for kind, members in scheme_members(n_words):
        assert kind in SCHEMES
        if len(members) < 2:
            continue
        bands, rows = lsh_bands(float(scheme_thresholds(kind, n_words[members], size_estimate[members], config.threshold).min()),
                                config.num_perm)
        pieces = [cut.remote(block, kind, bands, rows, partitions) for block in blocks]
        edges += [verify.remote(kind, bands, params, sizes, blocks, *(p[i] for p in pieces)) for i in range(partitions)]
    return _components(n_nodes, edges)
