"""Each ingest format on a small hand-written fixture, with the exact records and quarantine
reasons it must give; the implicit-prompt split; format detection."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from ingest_support import FIXTURES, pairs, reasons, run_ingest

from prefdata.formats.base import split_common_prefix, split_common_text
from prefdata.formats.registry import detect_format
from schemas.errors import UserError

U, A, S = "user", "assistant", "system"


def test_trl_explicit_prompt_standard_and_conversational(tmp_path):
    records, quarantine, manifest = run_ingest(tmp_path / "out", FIXTURES / "trl_explicit.jsonl")
    assert pairs(records) == [
        (1, [(U, "What colour is the sky?")], [(A, "It is blue.")], [(A, "It is green.")]),
        (2, [(S, "Be brief."), (U, "2+2?")], [(A, "4")], [(A, "5")]),
    ]
    assert reasons(quarantine) == {3: "identical_answers", 4: "wrong_type", 5: "missing_field"}
    assert {r["source"] for r in records} == {"trl_explicit.jsonl"}
    assert {r["source_format"] for r in records} == {"trl"}
    assert manifest.counts.model_dump() == {
        "read": 5, "kept": 2, "dropped": {"identical_answers": 1, "wrong_type": 1, "missing_field": 1}
    }
    assert quarantine[2]["raw"] == '{"prompt": "Hi", "chosen": "Hello!"}'
    assert quarantine[2]["message"] == "missing field 'rejected'"


def test_trl_implicit_prompt_splits_at_word_and_message_boundaries(tmp_path):
    records, quarantine, _ = run_ingest(tmp_path / "out", FIXTURES / "trl_implicit.jsonl")
    assert pairs(records) == [
        # shared text "The sky is blu" is cut back to the word boundary
        (1, [(U, "The sky is")], [(A, "blue.")], [(A, "bluish green.")]),
        (2, [(U, "Hi"), (A, "Hello!"), (U, "How are you?")], [(A, "Fine, thanks.")], [(A, "Go away.")]),
        # the shared messages end with an assistant turn: cut back to the last shared user turn
        (3, [(U, "Hi")], [(A, "Hello!"), (U, "Joke?"), (A, "No.")], [(A, "Hello!"), (U, "Poem?"), (A, "Roses.")]),
    ]
    assert reasons(quarantine) == {4: "empty_prompt", 5: "unsupported_role"}


def test_hh_transcripts(tmp_path):
    records, quarantine, manifest = run_ingest(tmp_path / "out", FIXTURES / "hh.jsonl")
    assert pairs(records) == [
        (1, [(U, "What is 2+2?")], [(A, "4.")], [(A, "5.")]),
        (2, [(U, "Hi there"), (A, "Hello! How can I help?"), (U, "Tell me a joke.")],
         [(A, "Why did the chicken cross the road?")], [(A, "No.")]),
        # the prefixes differ only in trailing whitespace: the same conversation
        (6, [(U, "Say something")], [(A, "Something.")], [(A, "Nothing.")]),
    ]
    assert reasons(quarantine) == {
        3: "hh_prefix_mismatch", 4: "hh_not_alternating", 5: "hh_not_alternating", 7: "empty_content"
    }
    assert manifest.stats["formats"] == {"hh": {"read": 7, "kept": 3}}


def test_llamafactory_sharegpt_json_array(tmp_path):
    records, quarantine, _ = run_ingest(tmp_path / "out", FIXTURES / "llamafactory_sharegpt.json")
    assert pairs(records) == [
        (1, [(U, "Translate 'cat' to French.")], [(A, "chat")], [(A, "chien")]),
        (2, [(S, "You are terse."), (U, "Hi"), (A, "Hi."), (U, "Bye")], [(A, "Bye.")], [(A, "Why?")]),
        (3, [(S, "Answer in English."), (U, "Capital of Italy?")], [(A, "Rome.")], [(A, "Milan.")]),
    ]
    assert reasons(quarantine) == {4: "unsupported_role", 5: "null_value"}
    # the raw text of an array element is the element as written in the file
    assert json.loads(quarantine[1]["raw"])["chosen"] == {"from": "gpt", "value": None}


def test_llamafactory_v1_typed_parts(tmp_path):
    records, quarantine, _ = run_ingest(tmp_path / "out", FIXTURES / "llamafactory_v1.jsonl")
    assert pairs(records) == [
        (1, [(S, "Be kind."), (U, "Rate my poem.")], [(A, "It is lovely.")], [(A, "It is bad.")]),
        (2, [(U, "Two parts")], [(A, "Joined.")], [(A, "Split.")]),
    ]
    assert reasons(quarantine) == {3: "unsupported_content"}
    assert {r["source_format"] for r in records} == {"llamafactory_v1"}


def test_openai_preference(tmp_path):
    records, quarantine, _ = run_ingest(tmp_path / "out", FIXTURES / "openai_preference.jsonl")
    assert pairs(records)[1] == (
        2, [(S, "Reply in French."), (U, "Good morning")], [(A, "Bonjour")], [(A, "Good morning")]
    )
    first = pairs(records)[0]
    assert first[1] == [(U, "Hello, can you tell me how cold San Francisco is today?")]
    assert first[3] == [(A, "It is not particularly cold in San Francisco today.")]
    assert first[2][0][1].endswith("a low around 57°F (14°C).")
    assert reasons(quarantine) == {3: "missing_field", 4: "wrong_type"}


def test_tabular_with_column_map_and_scores(tmp_path):
    column_map = {"system": "sys", "prompt": "question", "chosen": "good", "rejected": "bad",
                  "chosen_score": "good_score", "rejected_score": "bad_score"}
    records, quarantine, manifest = run_ingest(tmp_path / "out", FIXTURES / "tabular.csv",
                                               options={"column_map": column_map})
    assert pairs(records) == [
        (1, [(S, "You are helpful."), (U, "What is the boiling point of water?")],
         [(A, "100 °C at sea level.")], [(A, "Around 90 °C.")]),
        (2, [(U, "Multi-line\nquestion?")], [(A, "Yes.")], [(A, "No.")]),  # empty system: no system turn
    ]
    assert [(r["chosen_score"], r["rejected_score"]) for r in records] == [(9.0, 3.5), (None, None)]
    assert reasons(quarantine) == {3: "wrong_type"}
    assert manifest.config["format"] == "tabular"
    assert manifest.config["options"]["column_map"] == column_map


def test_tabular_unmapped_fields_read_their_own_columns(tmp_path):
    raw = tmp_path / "pairs.jsonl"
    row = {"system": "Be nice.", "question": "Why?", "chosen": "Because.", "rejected": "No."}
    raw.write_text(json.dumps(row) + "\n")
    records, _, _ = run_ingest(tmp_path / "out", raw, options={"column_map": {"prompt": "question"}})
    assert pairs(records) == [(1, [(S, "Be nice."), (U, "Why?")], [(A, "Because.")], [(A, "No.")])]


def test_tabular_map_naming_a_missing_column_is_a_user_error(tmp_path):
    message = r"tabular.csv: format tabular needs column\(s\) asked; the rows have \[bad, bad_score, good"
    with pytest.raises(UserError, match=message):
        run_ingest(tmp_path / "out", FIXTURES / "tabular.csv",
                   options={"column_map": {"prompt": "asked", "chosen": "good", "rejected": "bad"}})
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("chosen", "rejected", "expected"),
    [
        ("The sky is blue.", "The sky is bluish.", ("The sky is ", "blue.", "bluish.")),
        ("Say yes", "Say yesterday", ("Say ", "yes", "yesterday")),
        ("Answer: 42", "Answer: 42 or 43", ("Answer: 42", "", " or 43")),
        ("abc", "abd", ("", "abc", "abd")),
        ("Q\n\nA one", "Q\n\nB two", ("Q\n\n", "A one", "B two")),
    ],
)
def test_split_common_text_never_cuts_a_word(chosen, rejected, expected):
    assert split_common_text(chosen, rejected) == expected


WORD = st.text(alphabet="abcdefgh", min_size=1, max_size=6)


@given(shared=st.lists(WORD, max_size=5), tail_a=st.lists(WORD, min_size=1, max_size=4),
       tail_b=st.lists(WORD, min_size=1, max_size=4))
def test_split_common_text_is_the_shared_words(shared, tail_a, tail_b):
    chosen, rejected = " ".join(shared + tail_a), " ".join(shared + tail_b)
    prompt, a, b = split_common_text(chosen, rejected)
    assert prompt + a == chosen and prompt + b == rejected
    # cut at a word boundary, and never before the words both share
    assert prompt.split() == chosen.split()[: len(prompt.split())]
    assert len(prompt.split()) >= len(shared) or chosen == rejected


def test_split_common_prefix_ends_with_a_user_turn():
    u1, a1, u2 = {"role": U, "content": "q"}, {"role": A, "content": "a"}, {"role": U, "content": "q2"}
    x, y = {"role": A, "content": "x"}, {"role": A, "content": "y"}
    assert split_common_prefix([u1, a1, u2, x], [u1, a1, u2, y]) == ([u1, a1, u2], [x], [y])
    assert split_common_prefix([u1, a1, u2, x], [u1, a1, {"role": U, "content": "other"}, y]) == (
        [u1], [a1, u2, x], [a1, {"role": U, "content": "other"}, y]
    )
    assert split_common_prefix([x], [y]) == ([], [x], [y])


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"}, "hh"),
        ({"chosen": "The sky is blue", "rejected": "The sky is red"}, "trl"),
        ({"prompt": "q", "chosen": "a", "rejected": "b"}, "trl"),
        ({"chosen": [{"role": U, "content": "q"}], "rejected": [{"role": U, "content": "q"}]}, "trl"),
        ({"conversations": [], "chosen": {}, "rejected": {}}, "llamafactory"),
        ({"chosen_messages": [], "rejected_messages": []}, "llamafactory_v1"),
        ({"input": {}, "preferred_output": [], "non_preferred_output": []}, "openai"),
    ],
)
def test_detect_format_from_the_first_rows(row, expected):
    assert detect_format("x.jsonl", [row]) == expected


def test_detect_unknown_names_the_options():
    # orca_dpo_pairs: a prompt column TRL does not know, so chosen/rejected are not whole conversations
    with pytest.raises(UserError) as info:
        detect_format("orca.csv", [{"system": "", "question": "q", "chosen": "a", "rejected": "b"}])
    message = str(info.value)
    assert "orca.csv: no known preference format has columns [chosen, question, rejected, system]" in message
    assert "--format" in message and "--map prompt=COL" in message and "\n" not in message


def test_detect_ambiguous_names_the_candidates():
    row = {"conversations": [], "chosen": {}, "rejected": {}, "chosen_messages": [], "rejected_messages": []}
    with pytest.raises(UserError, match=r"fit several formats \(llamafactory, llamafactory_v1\); pass --format"):
        detect_format("both.jsonl", [row])


def test_detection_uses_the_columns_of_several_rows(tmp_path):
    # the first row lacks the optional prompt column; a later one has it → explicit-prompt TRL
    raw = tmp_path / "mixed.jsonl"
    rows = [{"chosen": "Paris is nice", "rejected": "Paris is big"},
            {"prompt": "Capital?", "chosen": "Paris.", "rejected": "Lyon."}]
    raw.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records, quarantine, _ = run_ingest(tmp_path / "out", raw)
    assert pairs(records) == [(2, [(U, "Capital?")], [(A, "Paris.")], [(A, "Lyon.")])]
    assert reasons(quarantine) == {1: "missing_field"}
