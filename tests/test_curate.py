import json
import random
import re
import subprocess
import sys

import numpy as np
import polars as pl
import pytest

from prefdata.curate import CurateConfig, curate
from schemas.errors import UserError
from tests.records_factory import make_record, write_records_dir

VOCAB = [f"w{i}" for i in range(3000)]


def _words(rng, n):
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def _near_copy(rng, text):
    """Change one word near the end: Jaccard of 5-gram shingles stays ≥ 0.85 for 80-word texts."""
    words = text.split()
    words[rng.randrange(len(words) - 8, len(words))] = rng.choice(VOCAB)
    return " ".join(words)


def _run(tmp_path, inputs, **options):
    return curate(CurateConfig(inputs=[str(p) for p in inputs], out=str(tmp_path / "out"), **options))


def _read(tmp_path, name):
    return pl.read_parquet(tmp_path / "out" / name)


def test_exact_duplicates_and_degenerate_pairs(tmp_path):
    keep = make_record("What is 2+2?", "4", "5", row=1, chosen_score=2.0, rejected_score=1.0)
    dup_case_space = make_record("what  is 2+2?", "4", "5", row=7)  # same after case-fold + whitespace collapse
    identical = make_record("Q", "Same Answer", "same   answer", row=3)  # differ only by case/space
    tie = make_record("Q2", "a", "b", row=4, chosen_score=3.0, rejected_score=3.0)
    low = make_record("Q3", "a", "b", row=5, chosen_score=3.0, rejected_score=2.5)
    fullwidth = make_record("Q4", "ＡＢＣ", "abc", row=6)  # NFKC folds full-width letters
    src = write_records_dir(tmp_path / "in", {"records": [dup_case_space, identical, keep, tie, low, fullwidth]}, stage="ingest")
    manifest = _run(tmp_path, [src], min_margin=1.0, eval_fraction=0.0)
    assert manifest.counts.dropped == {"duplicate": 1, "identical_after_normalisation": 2, "low_margin": 1, "tie": 1}
    assert manifest.counts.read == 6 and manifest.counts.kept == 1
    dropped = _read(tmp_path, "dropped.parquet")
    dup = dropped.filter(pl.col("drop_reason") == "duplicate")
    assert dup["source_row"].to_list() == [7] and dup["duplicate_of"].to_list() == [keep.id]
    assert _read(tmp_path, "train.parquet")["id"].to_list() == [keep.id]


@pytest.mark.parametrize("chunk_rows", [200_000, 2])
def test_contradicting_labels_resolved_by_majority(tmp_path, chunk_rows):
    """Issue 24, item 8: one pair preferred both ways round (after normalisation) by different
    annotators. Two votes to one: the one is dropped; one to one: both are; the majority's own
    repeats are then exact duplicates as before."""
    majority = [make_record("Which is kinder?", "Say thanks.", "Ignore them.", row=1),
                make_record("which is  KINDER?", "Say  thanks.", "IGNORE them.", row=2)]  # the same vote, folded
    minority = make_record("Which is kinder?", "Ignore them.", "say thanks.", row=3)
    tie = [make_record("Tea or coffee?", "Tea.", "Coffee.", row=4), make_record("Tea or coffee?", "coffee.", "tea.", row=5)]
    unrelated = make_record("Tea or coffee?", "Tea.", "Water.", row=6)  # shares an answer, not the pair
    src = write_records_dir(tmp_path / "in", {"records": [*majority, minority, *tie, unrelated]}, stage="ingest")
    manifest = _run(tmp_path, [src], eval_fraction=0.0, chunk_rows=chunk_rows)
    assert manifest.counts.dropped == {"conflicting_label": 3, "duplicate": 1}
    assert manifest.counts.read == 6 and manifest.counts.kept == 2
    dropped = _read(tmp_path, "dropped.parquet")
    reason_of = dict(zip(dropped["source_row"].to_list(), dropped["drop_reason"].to_list()))
    assert reason_of == {2: "duplicate", 3: "conflicting_label", 4: "conflicting_label", 5: "conflicting_label"}
    assert sorted(_read(tmp_path, "train.parquet")["source_row"].to_list()) == [1, 6]


def test_char_bounds(tmp_path):
    recs = [make_record(f"q{i}", "a" * n, "b" * 5, row=i) for i, n in enumerate([2, 10, 50])]
    src = write_records_dir(tmp_path / "in", {"records": recs}, stage="ingest")
    manifest = _run(tmp_path, [src], min_chars=3, max_chars=20, eval_fraction=0.0)
    assert manifest.counts.dropped == {"too_short": 1, "too_long": 1} and manifest.counts.kept == 1


def _near_dup_set(rng, n_clusters=60, members=3, singletons=120):
    records, truth = [], []
    for c in range(n_clusters):
        base = _words(rng, 80)
        for m in range(members):
            text = base if m == 0 else _near_copy(rng, base)
            records.append(make_record(text, f"good {c} {m}", f"bad {c} {m}", row=len(records),
                                       chosen_score=float(m + 2), rejected_score=0.0))
            truth.append(c)
    for s in range(singletons):
        records.append(make_record(_words(rng, 80), f"good s{s}", f"bad s{s}", row=len(records)))
        truth.append(n_clusters + s)
    return records, np.array(truth)


def test_near_duplicate_precision_and_recall(tmp_path):
    from prefdata.curate import _normalised
    from prefdata.neardup import prompt_clusters

    records, truth = _near_dup_set(random.Random(0))
    src = write_records_dir(tmp_path / "in", {"records": records}, stage="ingest")
    texts = pl.read_parquet(src / "records.parquet").select(_normalised("prompt"))["prompt"]
    labels = prompt_clusters(texts, ngram=5, threshold=0.8, num_perm=128, seed=0)
    pairs = np.triu_indices(len(records), 1)
    predicted, actual = (labels[:, None] == labels[None, :])[pairs], (truth[:, None] == truth[None, :])[pairs]
    precision = (predicted & actual).sum() / predicted.sum()
    recall = (predicted & actual).sum() / actual.sum()
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)


def test_split_keeps_clusters_whole_and_is_order_independent(tmp_path):
    rng = random.Random(1)
    records, _ = _near_dup_set(rng, n_clusters=150, members=3, singletons=300)
    src_a = write_records_dir(tmp_path / "a", {"records": records}, stage="ingest")
    shuffled = records[:]
    random.Random(2).shuffle(shuffled)
    src_b = write_records_dir(tmp_path / "b", {"records": shuffled}, stage="ingest")
    a = curate(CurateConfig(inputs=[str(src_a)], out=str(tmp_path / "out_a"), eval_fraction=0.2, seed=3))
    b = curate(CurateConfig(inputs=[str(src_b)], out=str(tmp_path / "out_b"), eval_fraction=0.2, seed=3))
    for name in ("train.parquet", "eval.parquet", "dropped.parquet"):
        assert (tmp_path / "out_a" / name).read_bytes() == (tmp_path / "out_b" / name).read_bytes()
    train = pl.read_parquet(tmp_path / "out_a" / "train.parquet")
    evals = pl.read_parquet(tmp_path / "out_a" / "eval.parquet")
    assert a.counts == b.counts and a.stats == b.stats
    assert a.counts.read == 750 and train.height + evals.height == 750
    assert 0.12 < evals.height / 750 < 0.28
    # every near-duplicate cluster is on one side: no eval prompt shares its first 60 words with a train prompt
    def head(frame):
        return set(frame.select(pl.col("prompt").list.first().struct.field("content").str.slice(0, 200))["content"])

    assert not head(train) & head(evals)
    assert a.stats["largest_cluster"] == 3 and a.stats["rows_in_multi_member_clusters"] == 450


def test_cap_keeps_largest_margins(tmp_path):
    records, _ = _near_dup_set(random.Random(4), n_clusters=5, members=3, singletons=0)
    src = write_records_dir(tmp_path / "in", {"records": records}, stage="ingest")
    manifest = _run(tmp_path, [src], max_pairs_per_prompt=2, eval_fraction=0.0)
    assert manifest.counts.dropped == {"prompt_cap": 5}
    capped = _read(tmp_path, "dropped.parquet")
    assert capped["chosen_score"].to_list() == [2.0] * 5  # margins 2 < 3 < 4: the smallest goes


def test_rerun_on_own_output_drops_nothing_and_is_byte_identical(tmp_path):
    records, _ = _near_dup_set(random.Random(5), n_clusters=20, members=3, singletons=40)
    records += [records[0].model_copy(update={"source_row": 999})]  # one exact duplicate
    src = write_records_dir(tmp_path / "in", {"records": records}, stage="ingest")
    first = curate(CurateConfig(inputs=[str(src)], out=str(tmp_path / "c1"), eval_fraction=0.3, max_pairs_per_prompt=2))
    again = curate(CurateConfig(inputs=[str(tmp_path / "c1")], out=str(tmp_path / "c2"), eval_fraction=0.3, max_pairs_per_prompt=2))
    assert first.counts.dropped == {"duplicate": 1, "prompt_cap": 20}
    assert again.counts.dropped == {} and again.counts.read == again.counts.kept == first.counts.kept
    for name in ("train.parquet", "eval.parquet"):
        assert (tmp_path / "c1" / name).read_bytes() == (tmp_path / "c2" / name).read_bytes()
    third = curate(CurateConfig(inputs=[str(src)], out=str(tmp_path / "c3"), eval_fraction=0.3, max_pairs_per_prompt=2))
    assert (tmp_path / "c3" / "manifest.json").read_bytes() != b"" and third.counts == first.counts
    for name in ("train.parquet", "eval.parquet", "dropped.parquet"):
        assert (tmp_path / "c1" / name).read_bytes() == (tmp_path / "c3" / name).read_bytes()


def test_decontaminate_plain_text(tmp_path):
    leaked_question = "please list every prime number between one and one hundred in increasing order with no other words"
    recs = [make_record(f"Hey, {leaked_question}!", "2, 3, 5", "no", row=1), make_record("unrelated short question", "yes", "no", row=2)]
    src = write_records_dir(tmp_path / "in", {"records": recs}, stage="ingest")
    eval_file = tmp_path / "bench.txt"
    eval_file.write_text("Some other item\n" + leaked_question.upper() + "\n")
    manifest = _run(tmp_path, [src], decontaminate=[str(eval_file)], eval_fraction=0.0)
    assert manifest.counts.dropped == {"contaminated": 1}
    assert _read(tmp_path, "train.parquet")["source_row"].to_list() == [2]


def test_bad_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no manifest.json"):
        _run(tmp_path, [tmp_path / "empty"])
    src = write_records_dir(tmp_path / "in", {"records": [make_record("q", "a", "b")]}, stage="ingest")
    raw = (src / "manifest.json").read_text().replace('"schema_version": 1', '"schema_version": 7')
    other = write_records_dir(tmp_path / "in2", {"records": [make_record("q2", "a", "b")]}, stage="ingest")
    (other / "manifest.json").write_text(raw)
    with pytest.raises(UserError, match="schema version 7"):
        _run(tmp_path, [src, other])
    cli = subprocess.run([sys.executable, "-m", "prefdata", "curate", str(tmp_path / "empty"), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True)
    assert cli.returncode == 2 and cli.stderr.count("\n") == 1 and "Traceback" not in cli.stderr
    assert not (tmp_path / "o").exists()


def test_decontaminate_against_an_ingestible_eval_set(tmp_path):
    leaked = "describe the plot of the film in exactly three short sentences without any spoilers at all please"
    recs = [make_record("unrelated question here", "yes", "no", row=1),
            make_record("fine", f"Sure: {leaked}.", "no", row=2)]  # the leak sits in an answer
    src = write_records_dir(tmp_path / "in", {"records": recs}, stage="ingest")
    eval_file = tmp_path / "evalset.jsonl"
    eval_file.write_text(json.dumps({"prompt": leaked, "chosen": "a", "rejected": "b"}) + "\n")
    manifest = _run(tmp_path, [src], decontaminate=[str(eval_file)], eval_fraction=0.0)
    assert manifest.counts.dropped == {"contaminated": 1}
    assert _read(tmp_path, "dropped.parquet")["source_row"].to_list() == [2]


def test_an_empty_record_set_curates_to_empty_splits(tmp_path):
    import pyarrow.parquet as pq

    empty = write_records_dir(tmp_path / "in", {"records": []}, stage="ingest")
    manifest = curate(CurateConfig(inputs=[str(empty)], out=str(tmp_path / "out")))
    assert manifest.counts.model_dump() == {"read": 0, "kept": 0, "dropped": {}}
    assert pq.read_table(tmp_path / "out" / "train.parquet").num_rows == 0


def test_a_damaged_record_file_or_an_out_over_an_input_is_one_line_and_nothing_is_written(tmp_path):
    src = write_records_dir(tmp_path / "in", {"records": [make_record(f"q{i}", "a", "b") for i in range(50)]}, stage="ingest")
    with pytest.raises(UserError, match="^" + re.escape(f"--out {src}: holds the input {src}")):
        curate(CurateConfig(inputs=[str(src)], out=str(src)))
    with pytest.raises(UserError, match="^" + re.escape(f"--out {src / 'curated'}: is inside the input folder {src}")):
        curate(CurateConfig(inputs=[str(src)], out=str(src / "curated")))
    data = (src / "records.parquet").read_bytes()
    (src / "records.parquet").write_bytes(data[:len(data) // 2])  # cut short, as a copy that died
    with pytest.raises(UserError, match=r"records.parquet: not a readable parquet file \(.*\); re-run prefdata ingest"):
        _run(tmp_path, [src])
    assert sorted(p.name for p in src.iterdir()) == ["manifest.json", "records.parquet"]
    assert not (tmp_path / "out").exists()


def test_scores_that_are_not_finite_are_dropped_with_their_reason(tmp_path):
    """A record set from before ingest refused them, or made by hand: NaN passed the tie and
    --min-margin rules and ranked first within its prompt."""
    good = make_record("q1", "a", "b", chosen_score=2.0, rejected_score=1.0)
    nan = make_record("q2", "a", "b", row=2, chosen_score=2.0, rejected_score=1.0).model_copy(update={"rejected_score": float("nan")})
    inf = make_record("q3", "a", "b", row=3, chosen_score=2.0, rejected_score=1.0).model_copy(update={"chosen_score": float("inf")})
    src = write_records_dir(tmp_path / "in", {"records": [good, nan, inf]}, stage="ingest")
    manifest = _run(tmp_path, [src], min_margin=0.5, eval_fraction=0)
    assert manifest.counts.model_dump() == {"read": 3, "kept": 1, "dropped": {"non_finite_score": 2}}
