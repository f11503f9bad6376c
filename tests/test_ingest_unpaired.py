"""Issue 27, ingest: unpaired feedback (one completion + a desirable/undesirable label, KTO data)
from TRL's unpaired layout, from binary-feedback exports through --map, and from pair or rated
dumps under --unpaired; every row kept or quarantined with its reason, and the manifest's label
counts exact, on fixtures written here."""

from __future__ import annotations

import csv
import json

import pyarrow.parquet as pq
import pytest
from ingest_support import reasons, run_ingest, turns

from prefdata.formats.base import DESIRABLE_LABELS, UNDESIRABLE_LABELS, FormatError, parse_label
from prefdata.ingest import summary_lines
from schemas.errors import UserError
from schemas.records import UNPAIRED_RECORD_SCHEMA

U, A = "user", "assistant"


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _labelled(records):
    """(source_row, prompt turns, completion turns, label, score) per record."""
    return [(r["source_row"], turns(r["prompt"]), turns(r["completion"]), r["label"], r["score"]) for r in records]


@pytest.mark.parametrize("word", sorted(DESIRABLE_LABELS | UNDESIRABLE_LABELS))
def test_every_vocabulary_word_and_its_case_variants(word):
    expected = word in DESIRABLE_LABELS
    assert parse_label(word, "label") is expected
    assert parse_label(f"  {word.upper()} ", "label") is expected


@pytest.mark.parametrize("value, expected", [
    (True, True), (False, False), (1, True), (0, False), (1.0, True), (0.0, False), ("1.0", True), (" 0 ", False),
    ("Thumbs Up", True), ("thumbs-down", False), ("THUMBS_UP", True), ("👍🏽", True), ("👎\ufe0f", False),
    ("Positive", True), ("negative", False), ("Like", True), ("DISLIKE", False), ("Desirable", True), ("undesirable", False),
])
def test_label_forms(value, expected):
    assert parse_label(value, "label") is expected


@pytest.mark.parametrize("value, reason", [
    ("maybe", "invalid_label"), (2, "non_binary_label"), (-1, "non_binary_label"), ("-1", "non_binary_label"),
    ("", "invalid_label"), (0.5, "non_binary_label"), (float("nan"), "invalid_label"), ("x" * 500, "invalid_label"),
    ([True], "wrong_type"), ({"up": 1}, "wrong_type"),
])
def test_bad_labels_are_one_line_reasons(value, reason):
    with pytest.raises(FormatError) as caught:
        parse_label(value, "thumbs")
    assert caught.value.reason == reason
    assert "\n" not in caught.value.message and len(caught.value.message) < 200 and "'thumbs'" in caught.value.message


@pytest.mark.parametrize("value", [2, -1, 0.5, 5.0, "-1", "+1", "-0", "3", "4.5"])
def test_a_number_other_than_0_or_1_names_the_score_fix(value):
    with pytest.raises(FormatError) as caught:
        parse_label(value, "stars")
    assert caught.value.reason == "non_binary_label"
    assert "map the column as score= with --unpaired --score-threshold T" in caught.value.message


def _csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return path


def test_a_minus_one_zero_plus_one_column_is_refused_per_source(tmp_path):
    # 0 is neutral on this scale: read as a label it would be "undesirable", 1 "desirable", only -1 caught
    votes = _csv(tmp_path / "votes.csv", [("q", "a", "vote"), ("Q", "A", "1"), ("Q", "B", "0"), ("Q", "C", "-1")])
    with pytest.raises(UserError) as caught:
        run_ingest(tmp_path / "o1", votes, options={"column_map": "prompt=q,completion=a,label=vote"})
    message = str(caught.value)
    assert "\n" not in message and "votes.csv: label column 'vote' holds numbers other than 0/1 ('-1')" in message
    assert "map the column as score= with --unpaired --score-threshold T (--map …,score=vote)" in message
    kto = _jsonl(tmp_path / "kto.jsonl", [{"prompt": "p", "completion": c, "label": v} for c, v in zip("abc", (1, 0, -1))])
    with pytest.raises(UserError, match=r"kto.jsonl: label column 'label' holds numbers other than 0/1 \(-1\)"):
        run_ingest(tmp_path / "o2", kto)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    # the fix the message names: the column as a score, labelled by a threshold
    records, _, _ = run_ingest(tmp_path / "o3", kto, options={"column_map": "score=label", "unpaired": True,
                                                              "score_threshold": 1})
    assert [(r["completion"][0]["content"], r["label"], r["score"]) for r in records] == [
        ("a", True, 1.0), ("b", False, 0.0), ("c", False, -1.0)]


def test_a_star_column_mapped_as_label_is_refused(tmp_path):
    # read per row, a 1 (the worst) would be kept as desirable and 2-5 quarantined
    stars = _csv(tmp_path / "stars.csv", [("q", "a", "stars"), *[("Q", f"A{s}", str(s)) for s in (1, 5, 3, 2, 4)]])
    with pytest.raises(UserError, match=r"stars.csv: label column 'stars' holds numbers other than 0/1 "
                       r"\('5', '3', '2', '4'\).*score= with --unpaired --score-threshold T"):
        run_ingest(tmp_path / "out", stars, options={"column_map": "prompt=q,completion=a,label=stars"})


def test_a_binary_number_column_is_still_read(tmp_path):
    path = _csv(tmp_path / "fb.csv", [("q", "a", "ok"), ("Q", "A", "1"), ("Q", "B", "0"), ("Q", "C", "1.0"),
                                      ("Q", "D", "0.0"), ("Q", "E", "up")])
    records, quarantine, manifest = run_ingest(tmp_path / "o1", path, options={"column_map": "prompt=q,completion=a,label=ok"})
    assert [(r["completion"][0]["content"], r["label"]) for r in records] == [
        ("A", True), ("B", False), ("C", True), ("D", False), ("E", True)]
    assert quarantine == [] and manifest.stats["labels"] == {"desirable": 3, "undesirable": 2}
    kto = _jsonl(tmp_path / "kto.jsonl", [{"prompt": "p", "completion": c, "label": v}
                                          for c, v in zip("abcd", (1, 0, 1.0, False))])
    records, _, _ = run_ingest(tmp_path / "o2", kto)
    assert [r["label"] for r in records] == [True, False, True, False]


def test_a_late_number_other_than_0_or_1_refuses_the_source_and_writes_nothing(tmp_path):
    """The first rows (all ingest reads before converting) are binary, later ones a rating: the 0s
    and 1s already read may be a scale's, so the run stops in one line naming the fix (a column
    sorted by label, say 1000 ones then −1/0 rows, would otherwise read its neutral 0s as thumbs down)."""
    rows = [{"prompt": f"p{i}", "completion": f"c{i}", "label": i % 2} for i in range(1000)]
    rows += [{"prompt": "p", "completion": "late", "label": 3}, {"prompt": "p", "completion": "late", "label": "+1"},
             {"prompt": "p", "completion": "late", "label": "yes"}]
    with pytest.raises(UserError, match=r"kto.jsonl: 2 rows' label holds a number other than 0/1 \(quarantine reason "
                                        r"non_binary_label\).*map the column as score= with --unpaired --score-threshold T") as exc:
        run_ingest(tmp_path / "out", _jsonl(tmp_path / "kto.jsonl", rows))
    assert "\n" not in str(exc.value) and not (tmp_path / "out").exists()


def test_a_ratings_only_export_read_unpaired_with_a_threshold(tmp_path):
    path = _csv(tmp_path / "stars.csv", [
        ("q", "a", "stars"),
        ("Boil an egg?", "Nine minutes.", "5"),     # 1 desirable
        ("Boil an egg?", "Microwave it.", "1"),     # 2 undesirable
        ("Capital of Peru?", "Lima.", "4"),         # 3 desirable: the threshold itself
        ("Capital of Peru?", "Cusco.", "3.5"),      # 4 undesirable
        ("Capital of Peru?", "Quito.", ""),         # 5 unrated
        ("Capital of Peru?", "Bogota.", "two"),     # 6 wrong_type
        ("Capital of Peru?", "", "5"),              # 7 empty_content
        ("Capital of Peru?", "Santiago.", "NaN"),   # 8 unrated: how pandas writes a missing value, not "below 4"
    ])
    column_map = "prompt=q,completion=a,score=stars"
    records, quarantine, manifest = run_ingest(
        tmp_path / "out", path, options={"column_map": column_map, "unpaired": True, "score_threshold": 4})
    assert [(r["source_row"], turns(r["prompt"]), turns(r["completion"]), r["label"], r["score"]) for r in records] == [
        (1, [(U, "Boil an egg?")], [(A, "Nine minutes.")], True, 5.0),
        (2, [(U, "Boil an egg?")], [(A, "Microwave it.")], False, 1.0),
        (3, [(U, "Capital of Peru?")], [(A, "Lima.")], True, 4.0),
        (4, [(U, "Capital of Peru?")], [(A, "Cusco.")], False, 3.5),
    ]
    assert reasons(quarantine) == {5: "unrated", 6: "wrong_type", 7: "empty_content", 8: "unrated"}
    c = manifest.counts
    assert (c.read, c.kept) == (8, 4) and c.read == c.kept + sum(c.dropped.values())
    assert c.dropped == {"unrated": 2, "wrong_type": 1, "empty_content": 1}
    assert manifest.stats["kind"] == "unpaired" and manifest.stats["labels"] == {"desirable": 2, "undesirable": 2}
    assert {r["source_format"] for r in records} == {"tabular"}
    # without a threshold, or without --unpaired: one line each, nothing written
    with pytest.raises(UserError, match="stars.csv: format tabular rates its answers; --unpaired needs --score-threshold T"):
        run_ingest(tmp_path / "o1", path, options={"column_map": column_map, "unpaired": True})
    with pytest.raises(UserError, match="completion and score with no label column.*add --unpaired --score-threshold T"):
        run_ingest(tmp_path / "o2", path, options={"column_map": column_map})
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_with_label_and_score_mapped_the_label_wins(tmp_path):
    path = _csv(tmp_path / "fb.csv", [("q", "a", "thumbs", "stars"), ("Q", "A", "down", "5"), ("Q", "B", "up", "1")])
    column_map = "prompt=q,completion=a,label=thumbs,score=stars"
    records, _, _ = run_ingest(tmp_path / "o1", path, options={"column_map": column_map})
    assert [(r["completion"][0]["content"], r["label"], r["score"]) for r in records] == [("A", False, 5.0), ("B", True, 1.0)]
    with pytest.raises(UserError, match="no input rates its answers"):
        run_ingest(tmp_path / "o2", path, options={"column_map": column_map, "unpaired": True, "score_threshold": 4})


def test_trl_unpaired_layout_strings_and_conversations(tmp_path):
    path = _jsonl(tmp_path / "kto.jsonl", [
        {"prompt": "What is 2+2?", "completion": "4", "label": True},                                   # 1
        {"prompt": "What is 2+2?", "completion": "5", "label": False},                                  # 2
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
         "completion": [{"role": "assistant", "content": "Hello!"}], "label": "thumbs_up"},             # 3
        {"prompt": "Name a colour.", "completion": "Blue.", "label": 0},                               # 4
        {"prompt": "Name a colour.", "completion": "  ", "label": 1},                                  # 5 empty completion
        {"prompt": "Name a colour.", "completion": "Red.", "label": "sometimes"},                      # 6
        {"prompt": "Name a colour.", "completion": "Red.", "label": None},                             # 7
        {"prompt": "Name a colour.", "completion": 7, "label": True},                                  # 8
        {"prompt": "Name a colour.", "completion": [], "label": True},                                 # 9
        {"prompt": "Name a colour.", "label": True},                                                   # 10
        {"prompt": "Name a colour.", "completion": [{"role": "user", "content": "x"}], "label": True},  # 11
        {"prompt": "Name a colour.", "completion": "Green.", "label": [1]},                            # 12
        {"prompt": [{"role": "tool", "content": "x"}], "completion": "Green.", "label": True},         # 13
    ])
    records, quarantine, manifest = run_ingest(tmp_path / "out", path)
    assert _labelled(records) == [
        (1, [(U, "What is 2+2?")], [(A, "4")], True, None),
        (2, [(U, "What is 2+2?")], [(A, "5")], False, None),
        (3, [("system", "Be brief."), (U, "Hi")], [(A, "Hello!")], True, None),
        (4, [(U, "Name a colour.")], [(A, "Blue.")], False, None),
    ]
    assert {r["source_format"] for r in records} == {"trl_unpaired"}
    assert reasons(quarantine) == {5: "empty_content", 6: "invalid_label", 7: "null_value", 8: "wrong_type",
                                   9: "empty_answer", 10: "missing_field", 11: "answer_not_starting_with_assistant",
                                   12: "wrong_type", 13: "unsupported_role"}
    assert all("\n" not in q["message"] for q in quarantine)
    c = manifest.counts
    assert c.read == 13 and c.kept == 4 and c.read == c.kept + sum(c.dropped.values())
    assert manifest.stats["kind"] == "unpaired"
    assert manifest.stats["labels"] == {"desirable": 2, "undesirable": 2}
    assert manifest.stats["sources"]["kto.jsonl"]["labels"] == {"desirable": 2, "undesirable": 2}
    assert pq.read_schema(tmp_path / "out" / "records.parquet") == UNPAIRED_RECORD_SCHEMA
    assert "  4 unpaired completions (2 desirable, 2 undesirable) from 4 prompts" in "\n".join(summary_lines(manifest))


def test_same_completion_labelled_both_ways_is_two_records(tmp_path):
    path = _jsonl(tmp_path / "kto.jsonl", [{"prompt": "p", "completion": "c", "label": v} for v in (True, False, "up")])
    records, _, _ = run_ingest(tmp_path / "out", path)
    ids = [r["id"] for r in records]
    assert ids[0] != ids[1] and ids[0] == ids[2]  # the id hashes prompt, completion and label


def test_binary_feedback_export_through_map(tmp_path):
    path = tmp_path / "feedback.csv"
    rows = [("question", "response", "thumbs", "rating"),
            ("How do I boil an egg?", "Boil it for 9 minutes.", "up", "5"),       # row 1 (the header is no row)
            ("How do I boil an egg?", "Microwave it whole.", "DOWN", "1"),        # 2
            ("Capital of Peru?", "Lima.", "👍", ""),                              # 3
            ("Capital of Peru?", "Cusco.", "Thumbs Down", "2"),                   # 4
            ("Capital of Peru?", "Quito.", "meh", "2"),                           # 5
            ("Capital of Peru?", "", "up", "2"),                                   # 6
            ("Capital of Peru?", "Lima, Peru.", "like", "x")]                      # 7
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    records, quarantine, manifest = run_ingest(
        tmp_path / "out", path, options={"column_map": "prompt=question,completion=response,label=thumbs,score=rating"})
    assert [(r["source_row"], r["completion"][0]["content"], r["label"], r["score"]) for r in records] == [
        (1, "Boil it for 9 minutes.", True, 5.0), (2, "Microwave it whole.", False, 1.0), (3, "Lima.", True, None),
        (4, "Cusco.", False, 2.0)]
    assert reasons(quarantine) == {5: "invalid_label", 6: "empty_content", 7: "wrong_type"}
    assert manifest.stats["labels"] == {"desirable": 2, "undesirable": 2}
    assert manifest.config["format"] == "tabular"


def test_map_mixing_pair_and_unpaired_fields_is_a_user_error(tmp_path):
    path = _jsonl(tmp_path / "x.jsonl", [{"q": "p", "a": "c", "b": "d", "t": "up"}])
    with pytest.raises(UserError, match="chosen do not belong to the unpaired"):
        run_ingest(tmp_path / "out", path, options={"column_map": "prompt=q,completion=a,chosen=b,label=t"})


def test_truncated_last_line(tmp_path):
    path = tmp_path / "kto.jsonl"
    good = json.dumps({"prompt": "p", "completion": "c", "label": "up"})
    path.write_text(good + "\n" + good.replace('"c"', '"d"') + "\n" + good[:25], encoding="utf-8")
    records, quarantine, manifest = run_ingest(tmp_path / "out", path)
    assert [r["source_row"] for r in records] == [1, 2]
    assert reasons(quarantine) == {3: "truncated_line"}
    assert manifest.counts.read == 3 and manifest.counts.dropped == {"truncated_line": 1}


def test_unpaired_splits_every_pair(tmp_path):
    path = _jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."},
        {"prompt": "Say bye.", "chosen": "Bye!", "rejected": "Bye!"},      # identical answers: fine apart
        {"prompt": "Say yes.", "chosen": "", "rejected": "No."},           # the empty chosen fails, rejected stays
        {"prompt": "Say no.", "chosen": 3, "rejected": "No."},
    ])
    records, quarantine, manifest = run_ingest(tmp_path / "out", path, options={"unpaired": True})
    assert _labelled(records) == [
        (1, [(U, "Say hi.")], [(A, "Hi!")], True, None), (1, [(U, "Say hi.")], [(A, "No.")], False, None),
        (2, [(U, "Say bye.")], [(A, "Bye!")], True, None), (2, [(U, "Say bye.")], [(A, "Bye!")], False, None),
        (3, [(U, "Say yes.")], [(A, "No.")], False, None),
    ]
    assert reasons(quarantine) == {4: "wrong_type"}
    assert manifest.stats["skipped"] == {"completion_empty_content": 1}
    assert manifest.counts.read == 4 and manifest.counts.kept == 3
    assert manifest.stats["labels"] == {"desirable": 2, "undesirable": 3}
    assert manifest.config["options"]["unpaired"] is True


def test_unpaired_on_a_real_orca_dump(tmp_path, realdata):
    path = realdata / "orca_dpo_pairs" / "orca_dpo_pairs_demo.csv"
    paired, _, pair_manifest = run_ingest(tmp_path / "pairs", path, options={"column_map": "prompt=question"})
    records, _, manifest = run_ingest(tmp_path / "unpaired", path, options={"column_map": "prompt=question", "unpaired": True})
    assert len(paired) == 100 and len(records) == 200
    assert manifest.counts == pair_manifest.counts
    assert manifest.stats["labels"] == {"desirable": 100, "undesirable": 100}
    for pair, (good, bad) in zip(paired, zip(records[::2], records[1::2])):
        assert good["prompt"] == bad["prompt"] == pair["prompt"]
        assert (good["completion"], good["label"], bad["completion"], bad["label"]) == (pair["chosen"], True, pair["rejected"], False)


def _uf_row(instruction, *ratings):
    """Raw UltraFeedback: one completion per rating (None: no annotations → unrated)."""
    return {"instruction": instruction, "completions": [
        {"model": f"m{i}", "response": f"{instruction} answer {i}",
         "annotations": {"helpfulness": {"Rating": str(r)}} if r is not None else {}}
        for i, r in enumerate(ratings)]}


def test_unpaired_rated_source_labels_every_rated_answer(tmp_path):
    path = _jsonl(tmp_path / "uf.jsonl", [
        _uf_row("A", 5, 2, 4, None),   # 3 rated: 5 and 4 reach the threshold 4, 2 does not; one unrated
        _uf_row("B", 3, 3),            # a tie: no pair, but two undesirable completions
        _uf_row("C", None),            # nothing rated
        _uf_row("D", 4),               # one answer: no pair, one desirable completion
    ])
    records, quarantine, manifest = run_ingest(tmp_path / "out", path, options={"unpaired": True, "score_threshold": 4})
    assert [(r["source_row"], r["completion"][0]["content"], r["label"], r["score"], json.loads(r["meta"])) for r in records] == [
        (1, "A answer 0", True, 5.0, {"model": "m0"}), (1, "A answer 1", False, 2.0, {"model": "m1"}),
        (1, "A answer 2", True, 4.0, {"model": "m2"}),
        (2, "B answer 0", False, 3.0, {"model": "m0"}), (2, "B answer 1", False, 3.0, {"model": "m1"}),
        (4, "D answer 0", True, 4.0, {"model": "m0"}),
    ]
    assert reasons(quarantine) == {3: "too_few_answers"}
    assert manifest.stats["skipped"] == {"unrated": 1}  # row A's; row C is quarantined whole, counted by its reason
    assert manifest.stats["labels"] == {"desirable": 3, "undesirable": 3}
    assert manifest.counts.read == 4 and manifest.counts.kept == 3
    # the same dump as pairs is unchanged: rows B, C and D have no pair
    pairs, pair_quarantine, _ = run_ingest(tmp_path / "pairs", path)
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"], json.loads(p["meta"])) for p in pairs] == [
        ("A answer 0", "A answer 1", {"chosen_model": "m0", "rejected_model": "m1"})]
    assert reasons(pair_quarantine) == {2: "tie", 3: "too_few_answers", 4: "too_few_answers"}


def test_unpaired_rated_pair_formats_and_helpsteer(tmp_path):
    binarized = _jsonl(tmp_path / "ufb.jsonl", [
        {"prompt": "Q", "chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}],
         "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "ok"}],
         "score_chosen": 8.0, "score_rejected": 7.0}])
    records, _, _ = run_ingest(tmp_path / "b", binarized, options={"unpaired": True, "score_threshold": 7})
    assert [(r["completion"][0]["content"], r["label"], r["score"]) for r in records] == [("good", True, 8.0), ("ok", True, 7.0)]
    ratings = {"correctness": 2, "coherence": 3, "complexity": 1, "verbosity": 1}
    helpsteer = _jsonl(tmp_path / "hs.jsonl", [
        {"prompt": "P", "response": "r1", "helpfulness": 4, **ratings},
        {"prompt": "P", "response": "r2", "helpfulness": 1, **ratings},
        {"prompt": "P2", "response": "r3", "helpfulness": 3, **ratings}])
    records, _, manifest = run_ingest(tmp_path / "h", helpsteer, options={"unpaired": True, "score_threshold": 3})
    assert [(r["source_row"], r["completion"][0]["content"], r["label"], r["score"]) for r in records] == [
        (1, "r1", True, 4.0), (1, "r2", False, 1.0), (3, "r3", True, 3.0)]
    assert manifest.counts.read == 3 and manifest.counts.kept == 3


def test_threshold_rules_are_one_line_user_errors(tmp_path):
    uf = _jsonl(tmp_path / "uf.jsonl", [_uf_row("A", 5, 2)])
    with pytest.raises(UserError, match="--unpaired needs --score-threshold"):
        run_ingest(tmp_path / "o1", uf, options={"unpaired": True})
    with pytest.raises(UserError, match="add --unpaired or drop it"):
        run_ingest(tmp_path / "o2", uf, options={"score_threshold": 4})
    pairs = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(UserError, match="no input rates its answers"):
        run_ingest(tmp_path / "o3", pairs, options={"unpaired": True, "score_threshold": 4})
    kto = _jsonl(tmp_path / "kto.jsonl", [{"prompt": "p", "completion": "a", "label": True}])
    with pytest.raises(UserError, match="holds pairs, other inputs unpaired feedback; add --unpaired"):
        run_ingest(tmp_path / "o4", pairs, kto)
    records, _, manifest = run_ingest(tmp_path / "o5", pairs, kto, options={"unpaired": True})
    assert [(r["source_format"], r["label"]) for r in records] == [("trl", True), ("trl", False), ("trl_unpaired", True)]
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o4").exists()


def test_unpaired_runs_alike_in_worker_processes(tmp_path, monkeypatch):
    import prefdata.ingest

    monkeypatch.setattr(prefdata.ingest, "RANGE_BYTES", 300)  # several byte ranges: jobs for two worker processes
    rows = [{"prompt": f"p{i}", "completion": f"c{i}", "label": ["up", "down", "maybe"][i % 3]} for i in range(30)]
    path = _jsonl(tmp_path / "kto.jsonl", rows)
    _, _, one = run_ingest(tmp_path / "one", path)
    _, _, two = run_ingest(tmp_path / "two", path, workers=2)
    assert (tmp_path / "one" / "records.parquet").read_bytes() == (tmp_path / "two" / "records.parquet").read_bytes()
    assert one.counts == two.counts and one.counts.dropped == {"invalid_label": 10}
    assert two.stats["labels"] == {"desirable": 10, "undesirable": 10}
