"""Issue 27, curate: unpaired record sets (one completion + a desirable/undesirable label) through
the same steps as pairs: exact duplicates, one completion labelled both ways, degenerate
completions, near-duplicate prompt clusters, the leak-free split, and the label balance per split
with KTO's weight advice. Record sets are made by `prefdata ingest` from JSONL written here."""

from __future__ import annotations

import json
import random

import polars as pl
import pyarrow.parquet as pq
import pytest

from prefdata.curate import CurateConfig, curate, summary_table
from prefdata.ingest import IngestConfig, ingest
from schemas.errors import UserError
from schemas.records import UNPAIRED_RECORD_SCHEMA

VOCAB = [f"w{i}" for i in range(3000)]


def _record_set(directory, rows, name="kto.jsonl"):
    """An unpaired record set: `rows` of (prompt, completion, label) through prefdata ingest."""
    directory.mkdir(parents=True)
    raw = directory / name
    raw.write_text("".join(json.dumps({"prompt": p, "completion": c, "label": lab}) + "\n" for p, c, lab in rows))
    out = directory / "records"
    manifest = ingest(IngestConfig(inputs=[str(raw)], out=str(out), workers=1))
    assert manifest.counts.kept == len(rows)
    return out


def _curate(tmp_path, inputs, out="out", **options):
    return curate(CurateConfig(inputs=[str(p) for p in inputs], out=str(tmp_path / out), **options))


def _read(tmp_path, name, out="out"):
    return pl.read_parquet(tmp_path / out / name)


BOIL = "What is the boiling point of water?"


def test_duplicates_conflicting_labels_and_degenerate_completions(tmp_path):
    records = _record_set(tmp_path / "in", [
        (BOIL, "100 °C at sea level.", "up"),                          # 1 kept
        ("what is the  boiling point of WATER?", "100 °C at sea level.", "like"),  # 2 the same after folding: duplicate of 1
        (BOIL, "100 °C at sea level.", "down"),                        # 3 outvoted 2 to 1: conflicting_label
        ("Is a tomato a fruit?", "Yes, botanically.", "up"),           # 4 } one vote each way:
        ("Is a tomato a fruit?", "yes,  botanically.", "down"),        # 5 } both conflicting_label
        ("Name a prime number.", "Nine.", "down"),                     # 6 kept
        ("Name a prime number.", "Seven.", "up"),                      # 7 kept
        ("Say something.", "ok", "up"),                                # 8 too_short under --min-chars 3
    ])
    manifest = _curate(tmp_path, [records], eval_fraction=0.0, min_chars=3)
    assert manifest.counts.read == 8 and manifest.counts.kept == 3
    assert manifest.counts.dropped == {"conflicting_label": 3, "duplicate": 1, "too_short": 1}
    train, dropped = _read(tmp_path, "train.parquet"), _read(tmp_path, "dropped.parquet")
    assert train["source_row"].to_list() == [1, 6, 7] and train["label"].to_list() == [True, False, True]
    assert dict(zip(dropped["source_row"], dropped["drop_reason"])) == {
        2: "duplicate", 3: "conflicting_label", 4: "conflicting_label", 5: "conflicting_label", 8: "too_short"}
    assert dropped.filter(pl.col("source_row") == 2)["duplicate_of"].to_list() == train["id"][:1].to_list()
    assert _read(tmp_path, "eval.parquet").height == 0
    schema = pq.read_schema(tmp_path / "out" / "train.parquet")
    assert schema.names == [*UNPAIRED_RECORD_SCHEMA.names, "prompt_cluster"]
    # nD = 2, nU = 1: desirable_weight in [nU/nD, 1.33 nU/nD], undesirable_weight in [nD/(1.33 nU), nD/nU]
    assert manifest.stats["labels"] == {
        "train": {"desirable": 2, "undesirable": 1}, "eval": {"desirable": 0, "undesirable": 0},
        "kto_weights": {"desirable_weight": [0.5, 0.665], "undesirable_weight": [pytest.approx(2 / 1.33), 2.0]}}


def test_one_label_only_gives_no_weight_advice(tmp_path):
    records = _record_set(tmp_path / "in", [("p1", "a", True), ("p2", "b", True)])
    manifest = _curate(tmp_path, [records], eval_fraction=0.0)
    assert manifest.stats["labels"]["kto_weights"] is None
    assert manifest.stats["labels"]["train"] == {"desirable": 2, "undesirable": 0}


def _families(n, seed=0):
    """n prompt families of three records: a 30-word prompt (up), a one-word edit of it (down),
    the same prompt reworded only in case and spacing (down). The family is in each completion.
    (30 words: a one-word edit is well inside the near-duplicate threshold there; under 12 words
    it sits exactly on it, where MinHash LSH finds it with high probability, not always.)"""
    rng = random.Random(seed)
    rows = []
    for f in range(n):
        words = [rng.choice(VOCAB) for _ in range(30)]
        edited = words.copy()
        edited[15] = rng.choice(VOCAB)
        rows += [(" ".join(words), f"family {f} answer a", "up"), (" ".join(edited), f"family {f} answer b", "down"),
                 ("  " + " ".join(words).upper() + " ", f"family {f} answer c", "thumbs_down")]
    rng.shuffle(rows)
    return rows


def test_split_keeps_prompt_clusters_whole_and_counts_the_balance(tmp_path):
    records = _record_set(tmp_path / "in", _families(40))
    manifest = _curate(tmp_path, [records], eval_fraction=0.3, seed=3)
    train, eval_ = _read(tmp_path, "train.parquet"), _read(tmp_path, "eval.parquet")
    assert manifest.counts.read == 120 and train.height + eval_.height == 120 and manifest.counts.dropped == {}
    assert not set(train["prompt_cluster"]) & set(eval_["prompt_cluster"])
    family = pl.col("completion").list.first().struct.field("content").str.extract(r"family (\d+)")
    split_of = pl.concat([train.select(family.alias("f"), pl.lit("train").alias("split")),
                          eval_.select(family.alias("f"), pl.lit("eval").alias("split"))])
    per_family = split_of.group_by("f").agg(pl.col("split").n_unique().alias("splits"), pl.len().alias("n"))
    assert per_family.height == 40 and per_family["splits"].to_list() == [1] * 40 and set(per_family["n"]) == {3}
    assert manifest.stats["prompt_clusters"] == 40 and manifest.stats["largest_cluster"] == 3
    n_eval = eval_.height // 3
    assert 0 < n_eval < 40 and manifest.stats["eval_clusters"] == n_eval
    # every family is one desirable and two undesirable records
    assert manifest.stats["labels"]["train"] == {"desirable": 40 - n_eval, "undesirable": 2 * (40 - n_eval)}
    assert manifest.stats["labels"]["eval"] == {"desirable": n_eval, "undesirable": 2 * n_eval}
    assert train["label"].sum() == 40 - n_eval and eval_["label"].sum() == n_eval
    assert manifest.stats["labels"]["kto_weights"] == {"desirable_weight": [2.0, 2.66],
                                                       "undesirable_weight": [pytest.approx(0.5 / 1.33), 0.5]}
    assert f"{40 - n_eval:,} / {2 * (40 - n_eval):,}" in list(summary_table(manifest).columns[1].cells)
    # curating the curated output again keeps every record and every cluster where it was
    again = _curate(tmp_path, [tmp_path / "out"], out="again", eval_fraction=0.3, seed=3)
    assert again.counts.dropped == {} and again.stats["labels"] == manifest.stats["labels"]
    assert _read(tmp_path, "train.parquet", "again").equals(train)


def test_output_does_not_depend_on_chunks_or_input_order(tmp_path):
    rows = _families(12, seed=1) + [("a duplicate prompt here", "same", True)] * 2 + [("a duplicate prompt here", "same", False)]
    first = _record_set(tmp_path / "a", rows[:20], name="a.jsonl")
    second = _record_set(tmp_path / "b", rows[20:], name="b.jsonl")
    reference = _curate(tmp_path, [first, second], out="ref", eval_fraction=0.25)
    assert reference.counts.dropped == {"conflicting_label": 1, "duplicate": 1}
    for out, inputs, chunk_rows in (("chunked", [first, second], 1), ("reversed", [second, first], 4)):
        manifest = _curate(tmp_path, inputs, out=out, eval_fraction=0.25, chunk_rows=chunk_rows)
        assert manifest.counts == reference.counts and manifest.stats == reference.stats
        for name in ("train.parquet", "eval.parquet", "dropped.parquet"):
            assert (tmp_path / out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), (out, name)


def test_cap_per_cluster_and_decontamination(tmp_path):
    leaked = "the quick brown fox jumps over the lazy dog near the river bank today"  # 14 words
    records = _record_set(tmp_path / "in", [
        ("Tell me a story.", "Once upon a time.", True),       # 1 kept: the first of its cluster
        ("Tell me a story.", "No.", False),                    # 2 prompt_cap
        ("tell me a story!", "There was a king.", True),       # 3 prompt_cap (the same cluster once folded)
        ("Describe a scene.", leaked, True),                   # 4 contaminated: its completion holds a 13-gram of the eval set
    ])
    evalset = tmp_path / "eval.txt"
    evalset.write_text(f"Item: {leaked}\n")
    manifest = _curate(tmp_path, [records], eval_fraction=0.0, max_pairs_per_prompt=1, decontaminate=[str(evalset)])
    assert manifest.counts.dropped == {"contaminated": 1, "prompt_cap": 2}
    assert _read(tmp_path, "train.parquet")["source_row"].to_list() == [1]
    assert dict(zip(*_read(tmp_path, "dropped.parquet").select("source_row", "drop_reason"))) == {
        2: "prompt_cap", 3: "prompt_cap", 4: "contaminated"}


def test_pair_options_and_mixed_kinds_are_refused(tmp_path):
    records = _record_set(tmp_path / "in", [("p", "c", True)])
    with pytest.raises(UserError, match="--min-margin: pair options"):
        _curate(tmp_path, [records], min_margin=1.0)
    with pytest.raises(UserError, match="--score-with: pair options"):
        _curate(tmp_path, [records], score_with="some/model")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    ingest(IngestConfig(inputs=[str(pairs)], out=str(tmp_path / "pair_records"), workers=1))
    with pytest.raises(UserError, match="holds pairs and .* unpaired completions; curate them apart"):
        _curate(tmp_path, [tmp_path / "pair_records", records])
    assert not (tmp_path / "out").exists()


def test_the_same_prompts_curated_as_pairs_and_unpaired_fall_in_the_same_split(tmp_path):
    """Clusters are named by a prompt, not a record: a dump curated as pairs and the same dump
    ingested --unpaired put every prompt on the same side, so a DPO and a KTO run from one dump
    share one held-out set (named by a record, 31 of 35 eval prompts landed in the other's train)."""
    from prefdata.formats.base import FormatOptions
    from tests.records_factory import make_record, write_records_dir

    rng = random.Random(5)
    words = [f"w{i}" for i in range(300)]
    pairs = [make_record(" ".join(rng.choice(words) for _ in range(12)), f"good {i}", f"bad {i}", row=i + 1) for i in range(120)]
    write_records_dir(tmp_path / "pairs", {"records": pairs}, stage="ingest")
    dump = tmp_path / "dump.jsonl"
    dump.write_text("".join(json.dumps({"prompt": r.prompt[0].content, "chosen": r.chosen[0].content,
                                        "rejected": r.rejected[0].content}) + "\n" for r in pairs))
    ingest(IngestConfig(inputs=[str(dump)], out=str(tmp_path / "unpaired"), options=FormatOptions(unpaired=True)))
    splits = {}
    for name in ("pairs", "unpaired"):
        curate(CurateConfig(inputs=[str(tmp_path / name)], out=str(tmp_path / f"{name}-curated"), eval_fraction=0.3))
        splits[name] = {split: {row["prompt"][0]["content"] for row in pq.read_table(tmp_path / f"{name}-curated" / f"{split}.parquet")
                                .to_pylist()} for split in ("train", "eval")}
    assert 20 < len(splits["pairs"]["eval"]) < 60
    assert splits["pairs"] == splits["unpaired"]
