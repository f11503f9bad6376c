"""Issue 3 formats: rated, ranked and voted sources → pairs, each on a hand-written fixture with the
exact pairs it must give, and on the real dumps in ../shared/realdata."""

from __future__ import annotations

import json

import pytest
from ingest_support import FIXTURES, pairs, reasons, run_ingest

from prefdata.ingest import summary_lines
from schemas.errors import UserError
from schemas.records import normalize_text

U, A, S = "user", "assistant", "system"


def scores(records):
    return [(r["chosen_score"], r["rejected_score"]) for r in records]


def test_shp_labels_scores_and_converted_hh_history(tmp_path):
    records, quarantine, manifest = run_ingest(tmp_path / "out", FIXTURES / "shp.jsonl")
    assert pairs(records) == [
        (1, [(U, "Why is the sky blue?")], [(A, "Rayleigh scattering.")], [(A, "Because it reflects the ocean.")]),
        (2, [(U, "Is water wet?")], [(A, "It makes things wet; water itself is not.")], [(A, "Yes.")]),
        (3, [(U, "Cats or dogs?")], [(A, "Cats.")], [(A, "Dogs.")]),
        (4, [(U, "Hi"), (A, "Hello!"), (U, "Name a fruit.")], [(A, "Apple.")], [(A, "Carrot.")]),
        (6, [(U, "Best editor?")], [(A, "emacs")], [(A, "vim")]),
    ]
    assert scores(records) == [(52.0, 10.0), (9.0, 3.0), (4.0, 3.0), (None, None), (8.0, 2.0)]
    assert records[0]["meta"] == '{"domain": "askscience", "post_id": "p1"}'
    assert reasons(quarantine) == {5: "invalid_label"}
    assert manifest.stats["formats"] == {"shp": {"read": 6, "kept": 5}}


def test_shp_min_score_ratio(tmp_path):
    records, quarantine, _ = run_ingest(tmp_path / "out", FIXTURES / "shp.jsonl", options={"min_score_ratio": 2})
    assert [r["source_row"] for r in records] == [1, 2, 6]  # row 6: no score_ratio, 8 / 2 = 4 from the scores
    assert reasons(quarantine) == {3: "low_score_ratio", 4: "no_score_ratio", 5: "invalid_label"}


def test_steamshp_real_file(tmp_path, realdata):
    path = realdata / "steamshp_format_hh_helpful_test" / "anthropic_helpful_test_head.jsonl"
    records, quarantine, manifest = run_ingest(tmp_path / "out", path)
    assert manifest.stats["sources"]["anthropic_helpful_test_head.jsonl"]["format"] == "shp"
    assert manifest.counts.model_dump() == {
        "read": 1331, "kept": 1324, "dropped": {"empty_content": 3, "hh_not_alternating": 3, "identical_answers": 1}
    }
    first = next(r for r in records if r["source_row"] == 1)
    assert turns_of(first["prompt"]) == [(U, "Do you know why turkeys became the official food of thanksgiving?")]
    assert first["chosen"][0]["content"].startswith("To be honest, I don’t know")  # labels 1: A preferred
    assert first["rejected"][0]["content"].startswith("I know that the American Indians")
    # every kept pair follows its label (SOURCE.txt: 692 zeros / 639 ones in this slice)
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert sum(r["labels"] for r in raw) == 639
    for record in records:
        row = raw[record["source_row"] - 1]
        preferred = row["human_ref_A"] if row["labels"] == 1 else row["human_ref_B"]
        assert record["chosen"][0]["content"] == normalize_text(preferred)
    assert max(len(r["prompt"]) for r in records) > 3  # multi-turn histories keep every earlier turn
    assert {q["source_row"] for q in quarantine if q["reason"] == "hh_not_alternating"} == {354, 986, 1126}


def turns_of(messages):
    return [(m["role"], m["content"]) for m in messages]


def test_oasst_trees_pairs_ranked_replies_along_the_path(tmp_path):
    records, quarantine, manifest = run_ingest(tmp_path / "out", FIXTURES / "oasst_trees.jsonl")
    assert pairs(records) == [
        (1, [(U, "What is 2+2?")], [(A, "4")], [(A, "5")]),  # rank 0 over rank 1.0; deleted / failed replies out
        (1, [(U, "What is 2+2?"), (A, "5"), (U, "Warum 5?")], [(A, "Ist es nicht.")], [(A, "Weil 2+3=5.")]),
    ]
    assert [json.loads(r["meta"]) for r in records][0] == {
        "message_tree_id": "t1", "chosen_id": "a1", "rejected_id": "a2", "chosen_rank": 0.0, "rejected_rank": 1.0
    }
    assert scores(records) == [(None, None), (None, None)]
    assert reasons(quarantine) == {2: "deleted", 3: "no_pairs", 4: "wrong_type"}
    # a3 and the message under it, a4; the tie of b1 and b2 under p2
    assert manifest.stats["skipped"] == {"deleted": 2, "review_failed": 1, "tie": 1}
    assert (manifest.stats["records"], manifest.stats["prompts"]) == (2, 2)


def test_oasst_lang_filter_and_all_pairs(tmp_path):
    records, _, manifest = run_ingest(tmp_path / "out", FIXTURES / "oasst_trees.jsonl",
                                      options={"lang": "en", "pairs": "all"})
    assert pairs(records) == [(1, [(U, "What is 2+2?")], [(A, "4")], [(A, "5")])]
    assert manifest.stats["skipped"] == {"other_lang": 3, "deleted": 2, "review_failed": 1, "tie": 1}


def test_oasst_real_tree_export(tmp_path, realdata):
    path = realdata / "oasst_export_trees" / "en_100_tree.jsonl"
    records, quarantine, manifest = run_ingest(tmp_path / "out", path)
    assert manifest.counts.model_dump() == {"read": 100, "kept": 100, "dropped": {}}
    # 212 prompter messages have two or more ranked replies (none deleted or failed in this file)
    assert (manifest.stats["records"], manifest.stats["prompts"]) == (212, 212)
    assert all(json.loads(r["meta"])["chosen_rank"] < json.loads(r["meta"])["rejected_rank"] for r in records)
    assert all(r["prompt"][-1]["role"] == "user" for r in records)
    _, _, every = run_ingest(tmp_path / "all", path, options={"pairs": "all"})
    assert (every.stats["records"], every.stats["prompts"]) == (754, 212)  # n(n-1)/2 per prompt, no tied ranks


UF_PROMPT = [(U, "Name a prime number.")]


def test_ultrafeedback_mean_of_aspects_skips_na_and_reads_list_aspects(tmp_path):
    records, quarantine, manifest = run_ingest(tmp_path / "out", FIXTURES / "ultrafeedback.jsonl")
    # means: m1 4.75, m2 3.0 (N/A left out, one aspect a one-element list), m3 unrated, m4 2.0
    assert pairs(records) == [(1, UF_PROMPT, [(A, "2 is prime.")], [(A, "1 is prime.")])]
    assert scores(records) == [(4.75, 2.0)]
    assert json.loads(records[0]["meta"]) == {"chosen_model": "m1", "rejected_model": "m4"}
    assert reasons(quarantine) == {2: "tie", 3: "too_few_answers", 4: "wrong_type"}
    assert manifest.stats["skipped"] == {"unrated": 1}


def test_ultrafeedback_score_rules_and_pairing_rules(tmp_path):
    records, _, _ = run_ingest(tmp_path / "a", FIXTURES / "ultrafeedback.jsonl", options={"score": "overall"})
    assert [(p[2], p[3]) for p in pairs(records)] == [([(A, "9 is prime.")], [(A, "1 is prime.")])]
    assert scores(records) == [(9.0, 3.0)]
    records, _, manifest = run_ingest(tmp_path / "b", FIXTURES / "ultrafeedback.jsonl",
                                      options={"score": "aspect:helpfulness", "pairs": "all"})
    assert scores(records) == [(5.0, 2.0)]  # m2 and m3 have no helpfulness rating
    assert manifest.stats["skipped"] == {"unrated": 2}
    records, _, _ = run_ingest(tmp_path / "c", FIXTURES / "ultrafeedback.jsonl", options={"pairs": "all"})
    assert scores(records) == [(4.75, 3.0), (4.75, 2.0), (3.0, 2.0)]
    records, _, manifest = run_ingest(tmp_path / "d", FIXTURES / "ultrafeedback.jsonl",
                                      options={"pairs": "all", "min_margin": 1.5})
    assert scores(records) == [(4.75, 3.0), (4.75, 2.0)]
    assert manifest.stats["skipped"] == {"unrated": 1, "pair_low_margin": 1}  # (3.0, 2.0): counted, not lost


def test_scores_that_are_not_finite_are_quarantined_in_every_format(tmp_path):
    """A NaN rating made the wrong answer best or stopped the run; a NaN or inf score kept as
    given reached train.parquet. Rated rows are quarantined by the pairing, and any record's
    score by its validation."""
    rows = [json.loads(line) for line in (FIXTURES / "ultrafeedback.jsonl").read_text().splitlines()][:1]
    rows[0]["completions"][1]["annotations"]["helpfulness"]["Rating"] = "nan"
    rows[0]["completions"][1]["overall_score"] = float("nan")
    rated = tmp_path / "rated.jsonl"
    rated.write_text(json.dumps(rows[0]) + "\n")
    _, quarantine, manifest = run_ingest(tmp_path / "a", rated, options={"score": "overall"})
    assert reasons(quarantine) == {1: "non_finite_score"} and manifest.counts.kept == 0
    binarized = [json.loads(line) for line in (FIXTURES / "ultrafeedback_binarized.jsonl").read_text().splitlines()][:1]
    binarized.append({**binarized[0], "score_chosen": float("inf")})
    binarized.append({**binarized[0], "score_rejected": float("nan")})
    path = tmp_path / "binarized.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in binarized))
    records, quarantine, _ = run_ingest(tmp_path / "b", path)
    assert [r["source_row"] for r in records] == [1] and reasons(quarantine) == {2: "finite_number", 3: "finite_number"}


def test_a_strength_or_rating_that_is_no_finite_float_is_quarantined(tmp_path):
    """NaN compares false both ways, so a NaN preference strength chose response 2; an integer past
    1e308 (Python's JSON parser keeps it whole) stopped the run with an OverflowError."""
    row = json.loads((FIXTURES / "helpsteer2_preference.jsonl").read_text().splitlines()[0])
    path = tmp_path / "strength.jsonl"
    path.write_text(json.dumps({**row, "preference_strength": float("nan")}) + "\n" + json.dumps(row) + "\n")
    records, quarantine, _ = run_ingest(tmp_path / "a", path)
    assert [r["source_row"] for r in records] == [2] and reasons(quarantine) == {1: "non_finite_score"}
    rated = json.loads((FIXTURES / "ultrafeedback.jsonl").read_text().splitlines()[0])
    rated["completions"][1]["overall_score"] = 10 ** 400
    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps(rated) + "\n")
    _, quarantine, _ = run_ingest(tmp_path / "b", path, options={"score": "overall"})
    assert reasons(quarantine) == {1: "non_finite_score"}


def test_a_flat_oasst_tree_with_a_repeated_message_id_is_quarantined(tmp_path):
    """Which reply answers which message is unknown: the best answer was lost and a pair written twice."""
    rows = [json.loads(line) for line in (FIXTURES / "oasst_flat.jsonl").read_text().splitlines()]
    tree = [row for row in rows if row["message_tree_id"] == "t1"]
    tree[2]["message_id"] = tree[1]["message_id"]
    path = tmp_path / "oasst.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in tree))
    records, quarantine, manifest = run_ingest(tmp_path / "out", path)
    assert records == [] and set(reasons(quarantine).values()) == {"duplicate_message_id"}
    assert manifest.counts.model_dump() == {"read": len(tree), "kept": 0, "dropped": {"duplicate_message_id": len(tree)}}


def test_ultrafeedback_rejects_an_unknown_score_rule(tmp_path):
    with pytest.raises(UserError, match="--score best: UltraFeedback takes mean-aspects, overall, aspect:NAME"):
        run_ingest(tmp_path / "out", FIXTURES / "ultrafeedback.jsonl", options={"score": "best"})


def test_ultrafeedback_binarized_keeps_scores_and_wins_detection_over_trl(tmp_path):
    records, quarantine, manifest = run_ingest(tmp_path / "out", FIXTURES / "ultrafeedback_binarized.jsonl")
    assert manifest.stats["formats"] == {"ultrafeedback_binarized": {"read": 2, "kept": 1}}
    assert pairs(records) == [(1, [(U, "Capital of Peru?")], [(A, "Lima.")], [(A, "Cusco.")])]
    assert scores(records) == [(9.0, 4.5)]
    assert reasons(quarantine) == {2: "tie"}


def test_arena_human_preference_csv(tmp_path):
    records, quarantine, _ = run_ingest(tmp_path / "out", FIXTURES / "arena.csv")
    assert pairs(records) == [
        (1, [(U, "What is 1+1?")], [(A, "2")], [(A, "3")]),
        # multi-turn: the shared first user turn is the prompt, later turns stay with their answers
        (2, [(U, "Hi")], [(A, "Hey!"), (U, "Tell a joke"), (A, "Why did the cow moo? Because.")],
         [(A, "Hello"), (U, "Tell a joke"), (A, "No.")]),
    ]
    assert [json.loads(r["meta"]) for r in records] == [
        {"chosen_model": "m-a", "rejected_model": "m-b"}, {"chosen_model": "m-b", "rejected_model": "m-a"}
    ]
    assert reasons(quarantine) == {3: "tie", 4: "null_value", 5: "invalid_json"}


def test_arena_conversations(tmp_path):
    records, quarantine, manifest = run_ingest(tmp_path / "out", FIXTURES / "arena_conversations.jsonl")
    assert pairs(records) == [
        (1, [(U, "Sky colour?")], [(A, "Blue.")], [(A, "Green.")]),
        (3, [(U, "Hi"), (A, "Hello"), (U, "Bye")], [(A, "Goodbye!")], [(A, "Ok.")]),
    ]
    assert reasons(quarantine) == {2: "tie"}
    assert manifest.counts.dropped == {"tie": 1}


def test_nectar_ranks_and_hh_prompts(tmp_path):
    records, quarantine, _ = run_ingest(tmp_path / "out", FIXTURES / "nectar.jsonl")
    assert pairs(records) == [
        (1, [(U, "Name a colour.")], [(A, "Red, a warm colour.")], [(A, "Table.")]),
        (2, [(U, "Hi"), (A, "Hello!"), (U, "Thanks")], [(A, "You're welcome.")], [(A, "Whatever.")]),
    ]
    assert json.loads(records[0]["meta"]) == {
        "chosen_model": "claude", "rejected_model": "llama", "chosen_rank": 1.0, "rejected_rank": 3.0
    }
    assert reasons(quarantine) == {3: "tie", 4: "hh_not_alternating"}
    records, _, _ = run_ingest(tmp_path / "adj", FIXTURES / "nectar.jsonl", options={"pairs": "adjacent"})
    chosen_rejected = [(p[2][0][1], p[3][0][1]) for p in pairs(records)]
    assert chosen_rejected[:2] == [("Red, a warm colour.", "Blue."), ("Blue.", "Table.")]


def test_pku_saferlhf_better_or_safer(tmp_path):
    records, quarantine, _ = run_ingest(tmp_path / "out", FIXTURES / "pku_saferlhf.jsonl")
    assert [(p[2][0][1], p[3][0][1]) for p in pairs(records)] == [
        ("Here is how: insert a tension wrench...", "I can't help with that, but a locksmith can."), ("Hi!", "Go away.")
    ]
    assert reasons(quarantine) == {3: "invalid_label"}
    records, _, _ = run_ingest(tmp_path / "safer", FIXTURES / "pku_saferlhf.jsonl", options={"label": "safer"})
    assert records[0]["chosen"][0]["content"] == "I can't help with that, but a locksmith can."
    assert json.loads(records[0]["meta"]) == {"label": "safer"}


def test_helpsteer2_preference_strength(tmp_path):
    records, quarantine, _ = run_ingest(tmp_path / "out", FIXTURES / "helpsteer2_preference.jsonl")
    assert pairs(records) == [
        (1, [(U, "Write a haiku.")], [(A, "Leaves fall slow / ...")], [(A, "A haiku is a poem.")]),
        (2, [(U, "Hi"), (A, "Hello!"), (U, "Tell me a fact.")], [(A, "Honey never spoils.")], [(A, "Fact.")]),
    ]
    assert reasons(quarantine) == {3: "tie"}
    records, quarantine, _ = run_ingest(tmp_path / "m", FIXTURES / "helpsteer2_preference.jsonl",
                                        options={"min_margin": 2})
    assert [r["source_row"] for r in records] == [1]
    assert reasons(quarantine) == {2: "low_margin", 3: "tie"}


def test_oasst_flat_rows_are_put_back_into_trees(tmp_path):
    records, quarantine, manifest = run_ingest(tmp_path / "out", FIXTURES / "oasst_flat.jsonl")
    assert pairs(records) == [
        (1, [(U, "What is 2+2?")], [(A, "4")], [(A, "5")]),
        (1, [(U, "What is 2+2?"), (A, "5"), (U, "Warum 5?")], [(A, "Ist es nicht.")], [(A, "Weil 2+3=5.")]),
        (14, [(U, "Pick a number.")], [(A, "Seven.")], [(A, "Banana.")]),  # a group is numbered by its first row
    ]
    # rows are counted one by one: tree t1 has 13 messages, t2 4 (one an orphan), t3 2 with no root
    assert manifest.counts.model_dump() == {"read": 19, "kept": 17, "dropped": {"no_root": 2}}
    assert [q["source_row"] for q in quarantine] == [18, 19]
    assert manifest.stats["skipped"] == {"deleted": 2, "review_failed": 1, "tie": 1, "orphan": 1}
    assert manifest.stats["formats"] == {"oasst": {"read": 19, "kept": 17}}


def test_helpsteer2_ratings_grouped_by_prompt(tmp_path):
    records, quarantine, manifest = run_ingest(tmp_path / "out", FIXTURES / "helpsteer2.jsonl")
    assert pairs(records) == [
        (1, [(U, "Explain DNS.")], [(A, "DNS maps names to addresses.")], [(A, "It is a network thing.")])
    ]
    assert scores(records) == [(4.0, 2.0)]
    assert reasons(quarantine) == {3: "tie", 4: "tie", 5: "too_few_answers"}
    assert manifest.counts.model_dump() == {"read": 5, "kept": 2, "dropped": {"tie": 2, "too_few_answers": 1}}
    records, quarantine, _ = run_ingest(tmp_path / "w", FIXTURES / "helpsteer2.jsonl", options={"score": "weighted"})
    assert [r["chosen"][0]["content"] for r in records] == [
        "DNS maps names to addresses.", "Hi! Lovely to meet you, how are you today?"
    ]
    assert scores(records) == [(pytest.approx(6.28), pytest.approx(4.8)), (pytest.approx(4.72), pytest.approx(4.64))]
    assert reasons(quarantine) == {5: "too_few_answers"}


def test_groups_and_multi_pair_rows_through_worker_processes(tmp_path, monkeypatch):
    """Chunks of two rows / groups (the grouped OASST rows), line ranges of about two rows
    (UltraFeedback), so even these small files go through the process pool."""
    import prefdata.ingest

    monkeypatch.setattr(prefdata.ingest, "CHUNK_ROWS", 2)
    monkeypatch.setattr(prefdata.ingest, "RANGE_BYTES", 1500)
    for name in ("oasst_flat.jsonl", "ultrafeedback.jsonl"):
        alone = run_ingest(tmp_path / f"{name}-1", FIXTURES / name, workers=1, options={"pairs": "all"})
        pooled = run_ingest(tmp_path / f"{name}-2", FIXTURES / name, workers=2, options={"pairs": "all"})
        assert pooled[:2] == alone[:2]
        assert pooled[2].counts == alone[2].counts and pooled[2].stats == alone[2].stats


def test_summary_says_how_many_pairs_from_how_many_prompts(tmp_path):
    _, _, manifest = run_ingest(tmp_path / "out", FIXTURES / "oasst_trees.jsonl", options={"pairs": "all"})
    assert summary_lines(manifest)[:2] == [
        'ingest: read 4, kept 1, quarantined 3 {"deleted": 1, "no_pairs": 1, "wrong_type": 1}',
        '  2 pairs from 2 prompts; parts of rows left out: {"deleted": 2, "review_failed": 1, "tie": 1}',
    ]
