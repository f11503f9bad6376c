"""Ingest on the real dumps in ../shared/realdata (read in place, never copied), with the counts
their SOURCE.txt documents."""

from __future__ import annotations

import pytest
from ingest_support import run_ingest, turns

from schemas.errors import UserError


def test_llamafactory_dpo_en_demo(tmp_path, realdata):
    path = realdata / "llamafactory_dpo_en_demo" / "dpo_en_demo.json"
    records, quarantine, manifest = run_ingest(tmp_path / "out", path)
    assert manifest.counts.model_dump() == {"read": 300, "kept": 300, "dropped": {}}
    assert quarantine == []
    assert manifest.stats["sources"]["dpo_en_demo.json"]["format"] == "llamafactory"
    # SOURCE.txt: 80 open with a system message, 114 single-turn, prompts up to 13 messages
    assert sum(r["prompt"][0]["role"] == "system" for r in records) == 80
    assert sum(len(r["prompt"]) == 1 for r in records) == 114
    assert max(len(r["prompt"]) for r in records) == 13
    assert all(r["prompt"][-1]["role"] == "user" for r in records)
    assert all(len(r["chosen"]) == len(r["rejected"]) == 1 for r in records)
    assert [r["source_row"] for r in records] == list(range(1, 301))
    assert len({r["id"] for r in records}) == 295  # five pairs occur twice in the file (curate's job)
    first = records[0]
    assert turns(first["prompt"]) == [("user", "Hi! I'd like to create a new language game simulating the first "
                                               "person perspective of a character named Angela.")]
    assert first["chosen"][0]["content"].startswith("That sounds like a fun and engaging idea!")


def test_llamafactory_v1_dpo_demo(tmp_path, realdata):
    path = realdata / "llamafactory_v1_dpo_demo" / "v1_dpo_demo.jsonl"
    records, quarantine, manifest = run_ingest(tmp_path / "out", path)
    assert manifest.counts.model_dump() == {"read": 10, "kept": 10, "dropped": {}}
    # implicit prompt: the shared system + user messages; only the last assistant turn differs
    assert all([m["role"] for m in r["prompt"]] == ["system", "user"] for r in records)
    first = records[0]
    assert first["rejected"][0]["content"].startswith("Abdulah Hasanagic is the proud owner of AS Company, a small")
    assert first["prompt"][1]["content"].endswith("Translate to English\n\nEnglish:")


def test_orca_dpo_pairs_with_a_column_map(tmp_path, realdata):
    records, quarantine, manifest = run_ingest(
        tmp_path / "out", realdata / "orca_dpo_pairs" / "orca_dpo_pairs_demo.csv",
        options={"column_map": {"system": "system", "prompt": "question"}},
    )
    assert manifest.counts.model_dump() == {"read": 100, "kept": 100, "dropped": {}}
    assert sum(r["prompt"][0]["role"] == "system" for r in records) == 92  # 8 rows have an empty system prompt
    assert not any(r["rejected"][0]["content"][0].isspace() for r in records)  # the leading space is trimmed
    assert len({r["id"] for r in records}) == 100


def test_openai_chat_sft_file_is_not_a_preference_format(tmp_path, realdata):
    with pytest.raises(UserError, match=r"no known preference format has columns \[messages\]; pass --format"):
        run_ingest(tmp_path / "out", realdata / "openai_chat_jsonl" / "toy_chat_fine_tuning.jsonl")
    assert not (tmp_path / "out").exists()
