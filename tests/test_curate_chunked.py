"""Bounded-memory curate (issue 15 item 3): chunked passes decide exactly what one in-memory
frame decided, whatever the chunk size and input order, and keep the stage's guarantees.

The oracle below is the single-frame curate as it was before chunking (every record with its
nested messages in one polars frame, near-duplicates from in-memory signatures with the
per-band prefilter), kept here only to be compared against.
"""

from __future__ import annotations

import hashlib
import io
import random
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import prefdata.curate as curate_module
from prefdata.curate import (
    CURATE_DROPPED_SCHEMA,
    CURATED_COLUMNS,
    CURATED_SCHEMA,
    CurateConfig,
    _degenerate,
    _fold,
    _key128,
    _normalised,
    curate,
)
from prefdata.neardup import (
    PREFILTER_SIGMAS,
    SignatureFile,
    candidate_pairs_from,
    comparison_text,
    components,
    exact_jaccard,
    lsh_bands,
    scheme_members,
    scheme_shingler,
    shares_shingle,
    shingles,
    short_thresholds,
    signatures,
    text_sizes,
)
from schemas.records import RECORD_FILES
from tests.records_factory import make_record, write_records_dir

# ---------------------------------------------------------------------------------------------
# The in-memory oracle


def _reference_candidate_pairs(sig: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, num_perm = sig.shape
    bands, rows = lsh_bands(float(thresholds.min()), num_perm)
    sources, targets = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for band in range(bands):
        block = np.ascontiguousarray(sig[:, band * rows:(band + 1) * rows])
        _, first_index, group = np.unique(block.view(np.dtype((np.void, block.dtype.itemsize * rows))).ravel(),
                                          return_index=True, return_inverse=True)
        representative = first_index[group.ravel()]
        candidate = np.flatnonzero(representative != np.arange(n))
        target = representative[candidate]
        needed = np.maximum(thresholds[candidate], thresholds[target])
        needed -= PREFILTER_SIGMAS * np.sqrt(needed * (1 - needed) / num_perm)
        keep = (sig[candidate] == sig[target]).mean(axis=1) >= needed
        sources.append(candidate[keep])
        targets.append(target[keep])
    pairs = np.unique(np.stack([np.concatenate(sources), np.concatenate(targets)], axis=1), axis=0)
    return pairs[:, 0], pairs[:, 1]


def _reference_prompt_clusters(folded: pl.Series, ngram: int, threshold: float, num_perm: int, seed: int) -> np.ndarray:
    text = comparison_text(folded)
    n_words, size_estimate = text_sizes(text)
    sources, targets = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for kind, members in scheme_members(n_words):
        if len(members) < 2:
            continue

        def threshold_of(rows, sizes, kind=kind):
            return short_thresholds(n_words[rows], sizes, threshold) if kind == "short" else np.full(len(rows), threshold)

        subset = text.gather(members)
        shingler = scheme_shingler(kind, ngram)
        s, t = _reference_candidate_pairs(signatures(subset, shingler, num_perm, seed), threshold_of(members, size_estimate[members]))
        jaccard, size_s, size_t = exact_jaccard(subset, shingler, s, t)
        longer = np.where(n_words[members[s]] >= n_words[members[t]], members[s], members[t])
        keep = jaccard >= threshold_of(longer, np.maximum(size_s, size_t)) - 1e-9
        sources.append(members[s[keep]])
        targets.append(members[t[keep]])
    return components(len(folded), np.concatenate(sources), np.concatenate(targets))


def _group_labels(keys: pl.Series) -> np.ndarray:
    return pl.DataFrame({"key": keys}).with_row_index("i").select(pl.col("i").first().over("key"))["i"].to_numpy().astype(np.int64)


def _reference_curate(config: CurateConfig) -> tuple[dict[str, bytes], dict, dict]:
    """(file name → parquet bytes, counts, stats) of the single-frame curate."""
    frames = []
    for directory in map(Path, config.inputs):
        stage = "curate" if (directory / "train.parquet").exists() else "ingest"
        for name in RECORD_FILES[stage]:
            table = pq.read_table(directory / name)
            if "prompt_cluster" not in table.schema.names:
                table = table.append_column("prompt_cluster", pa.nulls(table.num_rows, pa.string()))
            frames.append(pl.from_arrow(table.select(CURATED_COLUMNS)))
    records = pl.concat(frames).sort(["source", "source_row", "id"], maintain_order=True).with_row_index("row")
    frame = records.with_columns(prompt_norm=_normalised("prompt"), chosen_norm=_normalised("chosen"),
                                 rejected_norm=_normalised("rejected"), duplicate_of=pl.lit(None, pl.String))
    frame = _degenerate(frame, config).with_columns(pl.col("drop_reason").cast(pl.String))
    key = ["prompt_norm", "chosen_norm", "rejected_norm"]
    live = pl.col("drop_reason").is_null()
    is_later = live & (pl.col("row").filter(live).first().over(key) != pl.col("row"))
    frame = frame.with_columns(drop_reason=pl.when(is_later).then(pl.lit("duplicate")).otherwise("drop_reason"),
                               duplicate_of=pl.when(is_later).then(pl.col("id").filter(live).first().over(key)))
    if config.decontaminate:
        from prefdata.evalsets import load_eval_texts

        eval_texts = pl.select(_fold(pl.lit(pl.Series(load_eval_texts(config.decontaminate), dtype=pl.String)))).to_series()
        grams = np.unique(shingles(eval_texts, config.decontaminate_ngram)[1])
        hit = np.zeros(frame.height, dtype=bool)
        for column in key:
            stripped = frame[column].str.replace_all(r"(^|\n)(system|user|assistant): ", " ").str.replace_all(r"\s+", " ").str.strip_chars()
            hit |= shares_shingle(stripped, config.decontaminate_ngram, grams)
        frame = frame.with_columns(drop_reason=pl.when(pl.Series(hit) & live).then(pl.lit("contaminated")).otherwise("drop_reason"))
    live_frame = frame.filter(pl.col("drop_reason").is_null())
    if config.near_dup and live_frame.height:
        labels = _reference_prompt_clusters(live_frame["prompt_norm"], config.ngram, config.threshold, config.num_perm, config.seed)
    else:
        labels = _group_labels(live_frame["prompt_norm"])
    prior = live_frame["prompt_cluster"]
    if prior.null_count() < live_frame.height:
        rows = np.arange(live_frame.height)
        labels = components(live_frame.height, np.r_[rows, rows], np.r_[labels, _group_labels(prior.fill_null(live_frame["id"]))])
    margin = (pl.col("chosen_score") - pl.col("rejected_score")).fill_null(float("-inf"))
    ranked = (live_frame.select("row", "id", margin.alias("margin")).with_columns(label=pl.Series(labels))
              .sort(["label", "margin", "row"], descending=[False, True, False])
              .with_columns(rank=pl.int_range(pl.len()).over("label")).sort("row"))
    # A cluster keeps an earlier run's name (the smallest of them), else is named by the smallest
    # prompt key among its live rows before the cap (the key of the prompt's comparison text with
    # near-dedupe on, of its normalised text without), as 32 hex digits.
    prompt_text = (comparison_text(live_frame.select(_normalised("prompt", without_system=True)).to_series()) if config.near_dup
                   else live_frame["prompt_norm"])
    keys = _key128(prompt_text) if live_frame.height else np.empty((0, 2), np.uint64)
    live_frame = live_frame.with_columns(ranked["rank"], label=pl.Series(labels), key_high=pl.Series(keys[:, 0], dtype=pl.UInt64),
                                         key_low=pl.Series(keys[:, 1], dtype=pl.UInt64))
    by_key = live_frame.sort(["label", "key_high", "key_low", "row"]).group_by("label", maintain_order=True).first()
    name_of = {label: f"{high:016x}{low:016x}" for label, high, low in by_key.select("label", "key_high", "key_low").iter_rows()}
    name_of |= dict(live_frame.drop_nulls("prompt_cluster").group_by("label").agg(pl.col("prompt_cluster").min()).iter_rows())
    live_frame = live_frame.drop("prompt_cluster").with_columns(
        prompt_cluster=pl.Series([name_of[label] for label in live_frame["label"].to_list()], dtype=pl.String))
    if config.max_pairs_per_prompt is not None:
        live_frame = live_frame.with_columns(
            drop_reason=pl.when(pl.col("rank") >= config.max_pairs_per_prompt).then(pl.lit("prompt_cap")).otherwise("drop_reason"))
    dropped = pl.concat([frame.filter(pl.col("drop_reason").is_not_null()), live_frame.filter(pl.col("drop_reason").is_not_null())],
                        how="diagonal_relaxed").sort("row")
    kept = live_frame.filter(pl.col("drop_reason").is_null())
    names = kept["prompt_cluster"].unique().sort().to_list()
    unit = [int.from_bytes(hashlib.blake2b(f"{config.seed}:{k}".encode(), digest_size=8).digest(), "big") / 2**64 for k in names]
    is_eval = pl.DataFrame({"prompt_cluster": names, "is_eval": [u < config.eval_fraction for u in unit]},
                           schema_overrides={"is_eval": pl.Boolean})
    kept = kept.join(is_eval, on="prompt_cluster", how="left", maintain_order="left")
    tables = {"train.parquet": kept.filter(~pl.col("is_eval")).select(CURATED_COLUMNS).to_arrow().cast(CURATED_SCHEMA),
              "eval.parquet": kept.filter(pl.col("is_eval")).select(CURATED_COLUMNS).to_arrow().cast(CURATED_SCHEMA),
              "dropped.parquet": dropped.select(CURATE_DROPPED_SCHEMA.names).to_arrow().cast(CURATE_DROPPED_SCHEMA)}
    files = {}
    for name, table in tables.items():
        sink = io.BytesIO()
        pq.write_table(table, sink)
        files[name] = sink.getvalue()
    sizes = kept.group_by("prompt_cluster").len()["len"]
    counts = {"read": records.height, "kept": kept.height, "dropped": dict(sorted(Counter(dropped["drop_reason"].to_list()).items()))}
    stats = {"train": tables["train.parquet"].num_rows, "eval": tables["eval.parquet"].num_rows, "prompt_clusters": sizes.len(),
             "largest_cluster": int(sizes.max() or 0), "rows_in_multi_member_clusters": int(sizes.filter(sizes > 1).sum()),
             "eval_clusters": kept.filter(pl.col("is_eval"))["prompt_cluster"].n_unique()}
    return files, counts, stats


# ---------------------------------------------------------------------------------------------
# A record set where every step has work: short, long (both schemes) and templated near-duplicate
# prompts, exact duplicates up to case and spacing, degenerate pairs, scores for the cap.

VOCAB = [f"w{i}" for i in range(400)]


def _mixed_records(seed: int, n_groups: int = 40) -> list:
    rng = random.Random(seed)
    records = []

    def add(prompt, chosen, rejected, **scores):
        records.append(make_record(prompt, chosen, rejected, row=len(records) + 1, **scores))

    for g in range(n_groups):
        n_words = rng.choice([4, 8, 15, 25, 60, 125, 140, 170])
        base = [rng.choice(VOCAB) for _ in range(n_words)]
        for m in range(rng.randint(1, 4)):
            words = base[:]
            if m:
                words[rng.randrange(n_words)] = rng.choice(VOCAB)
            margin = float(rng.randint(0, 3))
            add(" ".join(words), f"good {g} {m}", f"bad {g} {m}", chosen_score=margin + 1, rejected_score=1.0)
        if rng.random() < 0.3:
            add(f"Translate to French: {rng.choice(VOCAB)} {rng.choice(VOCAB)}", f"fr {g}", f"no {g}")
    for i in range(0, len(records), 7):  # exact duplicates, up to case and spacing
        r = records[i]
        add(r.prompt[0].content.upper(), r.chosen[0].content.replace(" ", "  "), r.rejected[0].content)
    add("degenerate", "Same", "same")
    add("degenerate tie", "a", "b", chosen_score=2.0, rejected_score=2.0)
    add("the leaked benchmark question about seven purple elephants walking home today", "x", "y")
    return records


def _records_dir(tmp_path: Path, name: str, records: list, shuffle_seed: int | None = None) -> Path:
    records = records[:]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(records)
    return write_records_dir(tmp_path / name, {"records": records}, stage="ingest")


def _files(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in ("train.parquet", "eval.parquet", "dropped.parquet")}


CONFIGS = {
    "defaults": {"eval_fraction": 0.3},
    "cap_margin": {"eval_fraction": 0.3, "max_pairs_per_prompt": 2, "min_margin": 0.5, "seed": 4},
    "no_near_dup": {"eval_fraction": 0.3, "near_dup": False, "max_pairs_per_prompt": 1},
    "no_eval": {"eval_fraction": 0.0, "max_chars": 12},
}


@pytest.mark.parametrize("chunk_rows", [1, 7, 1000])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_chunked_equals_in_memory(tmp_path, name, chunk_rows):
    """Byte-identical train/eval/dropped and equal counts and stats, in input order (streamed
    pass 2) and shuffled (bucket sort on disk)."""
    records = _mixed_records(seed=len(name))
    for shuffle_seed in (None, 3):
        src = _records_dir(tmp_path, f"in-{shuffle_seed}", records, shuffle_seed)
        config = CurateConfig(inputs=[str(src)], out=str(tmp_path / f"out-{shuffle_seed}"), chunk_rows=chunk_rows, **CONFIGS[name])
        manifest = curate(config)
        files, counts, stats = _reference_curate(config)
        assert manifest.counts.model_dump() == counts
        assert manifest.stats == stats
        got = _files(Path(config.out))
        for file in files:
            assert got[file] == files[file], file
        assert sum(counts["dropped"].values()) > 0 and stats["eval"] + stats["train"] == counts["kept"]


def test_chunked_equals_in_memory_on_rerun_multiple_inputs_and_decontamination(tmp_path):
    """Re-curating curated output (prior clusters, train+eval files out of order) together with a
    second ingest set, against an evaluation set, with chunks of 5."""
    first = _records_dir(tmp_path, "a", _mixed_records(seed=11))
    curate(CurateConfig(inputs=[str(first)], out=str(tmp_path / "c1"), eval_fraction=0.4, max_pairs_per_prompt=1, chunk_rows=5))
    second = _records_dir(tmp_path, "b", _mixed_records(seed=12), shuffle_seed=1)
    eval_file = tmp_path / "bench.txt"
    eval_file.write_text("The leaked benchmark question about seven purple elephants walking home\n")
    config = CurateConfig(inputs=[str(tmp_path / "c1"), str(second)], out=str(tmp_path / "c2"), eval_fraction=0.3,
                          decontaminate=[str(eval_file)], decontaminate_ngram=5, chunk_rows=5)
    manifest = curate(config)
    files, counts, stats = _reference_curate(config)
    assert manifest.counts.model_dump() == counts and counts["dropped"].get("contaminated") == 1
    assert manifest.stats == stats
    assert _files(tmp_path / "c2") == files


def test_output_does_not_depend_on_chunk_size(tmp_path, monkeypatch):
    """With row groups smaller than the output, files still match byte for byte across chunk sizes."""
    monkeypatch.setattr(curate_module, "ROW_GROUP_ROWS", 16)
    src = _records_dir(tmp_path, "in", _mixed_records(seed=5), shuffle_seed=2)
    outs = []
    for chunk_rows in (3, 64, 10_000):
        out = tmp_path / f"out-{chunk_rows}"
        curate(CurateConfig(inputs=[str(src)], out=str(out), eval_fraction=0.3, chunk_rows=chunk_rows))
        outs.append(_files(out))
        assert pq.ParquetFile(out / "train.parquet").metadata.num_row_groups > 1
    assert outs[0] == outs[1] == outs[2]


def test_every_record_is_accounted_for(tmp_path):
    records = _mixed_records(seed=6)
    src = _records_dir(tmp_path, "in", records, shuffle_seed=4)
    manifest = curate(CurateConfig(inputs=[str(src)], out=str(tmp_path / "out"), max_pairs_per_prompt=1, chunk_rows=4))
    out = {name: pl.read_parquet(tmp_path / "out" / f"{name}.parquet") for name in ("train", "eval", "dropped")}
    assert Counter(r.id for r in records) == Counter(sum((f["id"].to_list() for f in out.values()), []))
    assert manifest.counts.read == len(records) == manifest.counts.kept + sum(manifest.counts.dropped.values())
    assert out["dropped"]["drop_reason"].null_count() == 0
    assert Counter(out["dropped"]["drop_reason"].to_list()) == manifest.counts.dropped
    for frame in out.values():  # each file in (source, source_row, id) order
        assert frame.select("source", "source_row", "id").equals(frame.select("source", "source_row", "id").sort(pl.all()))


def test_memory_is_bounded_by_chunk_rows(tmp_path, monkeypatch):
    """No step before the near-duplicate join sees more than chunk_rows records with their
    messages: pass 1 chunks, pass 2 chunks and bucket-sorted batches all stay within it."""
    seen = []
    narrow_chunk, route = curate_module._narrow_chunk, curate_module._route

    def spy_narrow(table, *args):
        seen.append(("pass1", table.num_rows))
        return narrow_chunk(table, *args)

    def spy_route(table, outputs):
        seen.append(("pass2", table.num_rows))
        return route(table, outputs)

    monkeypatch.setattr(curate_module, "_narrow_chunk", spy_narrow)
    monkeypatch.setattr(curate_module, "_route", spy_route)
    records = _mixed_records(seed=7)
    for shuffle_seed in (None, 5):
        seen.clear()
        src = _records_dir(tmp_path, f"in-{shuffle_seed}", records, shuffle_seed)
        curate(CurateConfig(inputs=[str(src)], out=str(tmp_path / "out"), chunk_rows=9))
        assert {stage for stage, _ in seen} == {"pass1", "pass2"}
        assert max(n for _, n in seen) <= 9
        assert sum(n for stage, n in seen if stage == "pass2") == len(records)


def test_signature_file_reads_the_columns_it_was_given(tmp_path):
    rng = np.random.default_rng(0)
    blocks = [rng.integers(0, 2**32, size=(n, 16), dtype=np.uint32) for n in (5, 0, 1, 9)]
    store = SignatureFile(tmp_path / "sig.bin", 16)
    for block in blocks:
        store.append(block)
    whole = np.concatenate(blocks)
    assert len(store) == len(whole)
    for lo, hi in ((0, 16), (3, 7), (15, 16)):
        assert np.array_equal(store.columns(lo, hi), whole[:, lo:hi])
    store.close()


def test_band_at_a_time_candidates_equal_the_per_band_prefilter():
    """candidate_pairs_from (pairs of all bands, then one prefilter) keeps the pairs the per-band
    prefilter kept, on signatures with planted near-duplicates and identical rows."""
    rng = np.random.default_rng(1)
    base = rng.integers(0, 1000, size=(300, 128), dtype=np.uint32)
    sig = base.copy()
    twins = rng.choice(300, 120, replace=False)
    sig[twins[:60]] = sig[twins[60:]]
    noise = rng.random(sig[twins[:60]].shape) < rng.uniform(0.05, 0.5, size=(60, 1))
    sig[twins[:60]] = np.where(noise, rng.integers(0, 1000, size=noise.shape, dtype=np.uint32), sig[twins[:60]])
    thresholds = rng.uniform(0.4, 0.8, size=300)
    got = candidate_pairs_from(lambda lo, hi: np.ascontiguousarray(sig[:, lo:hi]), 300, 128, thresholds)
    want = _reference_candidate_pairs(sig, thresholds)
    assert len(want[0]) > 20
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_a_failed_run_leaves_the_previous_output(tmp_path, monkeypatch):
    src = _records_dir(tmp_path, "in", _mixed_records(seed=8), shuffle_seed=6)
    out = tmp_path / "out"
    curate(CurateConfig(inputs=[str(src)], out=str(out), eval_fraction=0.3, chunk_rows=4))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls, route = [], curate_module._route

    def failing_route(table, outputs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        route(table, outputs)

    monkeypatch.setattr(curate_module, "_route", failing_route)
    with pytest.raises(OSError, match="disk full"):
        curate(CurateConfig(inputs=[str(src)], out=str(out), eval_fraction=0.5, chunk_rows=4))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # no spill or partial output left behind


def test_a_killed_run_leaves_the_previous_output(tmp_path):
    """SIGKILL in the middle of pass 2: the finished output is untouched and the next run works."""
    src = _records_dir(tmp_path, "in", _mixed_records(seed=9))
    out = tmp_path / "out"
    curate(CurateConfig(inputs=[str(src)], out=str(out), eval_fraction=0.3, chunk_rows=4))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    script = textwrap.dedent(f"""
        import os, signal
        import prefdata.curate as c
        route, calls = c._route, []
        def killing_route(table, outputs):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            route(table, outputs)
        c._route = killing_route
        c.curate(c.CurateConfig(inputs=[{str(src)!r}], out={str(out)!r}, eval_fraction=0.6, chunk_rows=4))
    """)
    killed = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1])
    assert killed.returncode == -9
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    again = curate(CurateConfig(inputs=[str(src)], out=str(out), eval_fraction=0.3, chunk_rows=4))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "manifest.json"} == \
        {k: v for k, v in before.items() if k != "manifest.json"}
    assert again.counts.read == len(pl.read_parquet(src / "records.parquet"))


def test_cluster_ranks_match_the_polars_sort():
    """The numpy ranking orders margins as the single-frame polars sort did: largest first, NaN
    above everything, a missing score (−inf) last, ties by row."""
    from prefdata.curate import _rank_in_clusters

    rng = np.random.default_rng(2)
    n = 2000
    rows = np.sort(rng.choice(10 * n, n, replace=False))
    margin = rng.choice([np.nan, -np.inf, 0.5, 1.0, 2.0, -3.0], size=n)
    labels = rng.integers(0, 300, size=n)
    rank = _rank_in_clusters(rows, margin, labels)
    want = (pl.DataFrame({"row": rows, "margin": margin, "label": labels})
            .sort(["label", "margin", "row"], descending=[False, True, False])
            .with_columns(rank=pl.int_range(pl.len()).over("label")).sort("row"))
    assert np.array_equal(rank, want["rank"].to_numpy())


def test_band_groups_stay_exact_when_the_band_hash_collides(monkeypatch):
    """Band rows are grouped by a 64-bit mix and then checked: with a mix that puts every row in
    one group, the representatives are still the exact ones."""
    import prefdata.neardup as neardup

    rng = np.random.default_rng(3)
    block = rng.integers(0, 4, size=(500, 3), dtype=np.uint32)
    want = neardup._band_representatives(block)
    _, first_index, group = np.unique(block.view(np.dtype((np.void, 12))).ravel(), return_index=True, return_inverse=True)
    assert np.array_equal(want, first_index[group.ravel()])
    monkeypatch.setattr(neardup, "_band_hash", lambda b: np.zeros(len(b), np.uint64))
    assert np.array_equal(neardup._band_representatives(block), want)
    assert len(np.unique(want)) > 10


def test_signature_file_places_rows_at_given_positions(tmp_path):
    rng = np.random.default_rng(4)
    blocks = [rng.integers(0, 2**32, size=(n, 8), dtype=np.uint32) for n in (4, 7)]
    store = SignatureFile(tmp_path / "sig.bin", 8)
    for block in blocks:
        store.append(block)
    whole = np.concatenate(blocks)
    position = rng.permutation(len(whole))
    got = store.columns(2, 6, position)
    assert np.array_equal(got[position], whole[:, 2:6])
    store.close()


def _cluster_of_prompt(out: Path) -> dict[str, str]:
    frames = [pl.read_parquet(out / name) for name in ("train.parquet", "eval.parquet", "dropped.parquet")]
    rows = pl.concat([f.select(pl.col("prompt").list.first().struct.field("content").alias("prompt"), "prompt_cluster")
                      for f in frames]).drop_nulls()
    return dict(rows.unique("prompt", keep="first").iter_rows())


def _split_of_prompt(out: Path) -> dict[str, str]:
    return {row["prompt"][0]["content"]: split for split in ("train", "eval")
            for row in pq.read_table(out / f"{split}.parquet", columns=["prompt"]).to_pylist()}


def test_better_pairs_for_old_prompts_move_no_cluster_under_the_cap(tmp_path):
    """A cluster is named by its live prompts before the cap, so a new pair that outranks the kept
    one (and so changes which pair the cap keeps) leaves every cluster's name and split as it was.
    Exact-prompt clusters (--no-near-dup): which borderline near-duplicates LSH links can change
    when rows are added (docs/curate.md), which is another matter."""
    records = _mixed_records(seed=1)
    better = [make_record(r.prompt[0].content, f"much better {i}", f"worse {i}", row=10_000 + i, chosen_score=20.0,
                          rejected_score=1.0) for i, r in enumerate(records[:40])]
    names = {}
    for name, rows in (("before", records), ("after", records + better)):
        src = write_records_dir(tmp_path / f"in-{name}", {"records": rows}, stage="ingest")
        curate(CurateConfig(inputs=[str(src)], out=str(tmp_path / name), eval_fraction=0.3, max_pairs_per_prompt=1,
                            near_dup=False))
        names[name] = _cluster_of_prompt(tmp_path / name)
    assert names["before"] == {prompt: names["after"][prompt] for prompt in names["before"]}
    kept_before, kept_after = _split_of_prompt(tmp_path / "before"), _split_of_prompt(tmp_path / "after")
    moved = [p for p in kept_before if p in kept_after and kept_before[p] != kept_after[p]]
    assert not moved and len(kept_before.keys() & kept_after.keys()) > 20


def test_clusters_named_by_an_earlier_version_keep_their_names_and_split(tmp_path):
    """Output whose prompt_cluster holds another naming (earlier prefdata named a cluster by a
    record id) curated again: each cluster keeps that name, and the split it decides."""
    src = _records_dir(tmp_path, "in", _mixed_records(seed=2))
    curate(CurateConfig(inputs=[str(src)], out=str(tmp_path / "first"), eval_fraction=0.3))
    old = tmp_path / "old-naming"
    old.mkdir()
    renamed = {}
    for name in ("train.parquet", "eval.parquet", "dropped.parquet"):
        table = pl.read_parquet(tmp_path / "first" / name)
        # An old-style name: a record id of the cluster (blake2b-128 hex, like a prompt key's).
        table = table.with_columns(prompt_cluster=pl.col("id").first().over("prompt_cluster"))
        renamed |= dict(table.select("prompt_cluster").unique().with_columns(x=pl.lit(1)).iter_rows())
        pq.write_table(table.to_arrow().cast(pq.read_schema(tmp_path / "first" / name)), old / name)
    (old / "manifest.json").write_bytes((tmp_path / "first" / "manifest.json").read_bytes())
    curate(CurateConfig(inputs=[str(old)], out=str(tmp_path / "again"), eval_fraction=0.3))
    again = pl.concat([pl.read_parquet(tmp_path / "again" / f"{split}.parquet").with_columns(split=pl.lit(split))
                       for split in ("train", "eval")])
    assert set(again["prompt_cluster"]) <= set(renamed)
    decided = dict(zip(again["prompt_cluster"].to_list(),
                       curate_module._is_eval(pa.array(again["prompt_cluster"].to_list()), CurateConfig(inputs=["x"], out="y",
                                                                                                      eval_fraction=0.3))))
    assert all((split == "eval") == decided[name] for name, split in again.select("prompt_cluster", "split").iter_rows())
