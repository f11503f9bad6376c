import hashlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas.errors import UserError
from schemas.manifest import Counts, Manifest
from schemas.records import RECORD_SCHEMA, PreferenceRecord, _stable_hash, normalize_text, records_to_table


def _rec(**over):
    base = dict(
        prompt=[{"role": "user", "content": "Hi"}],
        chosen=[{"role": "assistant", "content": "Hello!"}],
        rejected=[{"role": "assistant", "content": "Go away."}],
        source="f.jsonl",
        source_format="trl",
        source_row=1,
    )
    base.update(over)
    return PreferenceRecord.model_validate(base)


def _reason(exc: ValidationError) -> str:
    return exc.errors()[0]["type"]


def test_normalisation_strips_bom_crlf_and_composes():
    assert normalize_text("\ufeff  cafe\u0301\r\nok \r") == "caf\u00e9\nok"


def test_id_is_stable_content_hash_and_ignores_provenance():
    a = _rec()
    b = _rec(source="other.csv", source_row=99, chosen_score=3.0)
    assert a.id == b.id
    assert len(a.id) == 32
    # Normalisation happens before hashing: stray whitespace does not change the id.
    assert _rec(chosen=[{"role": "assistant", "content": "  Hello!\r\n"}]).id == a.id
    assert _rec(chosen=[{"role": "assistant", "content": "Hello"}]).id != a.id


def test_id_pinned_value_so_ids_never_change_between_versions():
    assert _rec().id == "28d6f1ecc05ff6d55795af4f2a7f18ff"


NO_SURROGATES = st.text(st.characters(blacklist_categories=("Cs",)))  # readers quarantine those (invalid_utf8)


@given(NO_SURROGATES, NO_SURROGATES)
def test_id_hashes_the_compact_json_it_was_defined_with(prompt, answer):
    """The id is blake2b-128 of json.dumps(..., ensure_ascii=False, separators=(",", ":")); the
    faster encoder must write those bytes for any text (control characters, quotes, non-ASCII)."""
    pairs = [[["user", prompt]], [["assistant", answer]], [["assistant", answer + "x"]]]
    blob = json.dumps(pairs, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    assert _stable_hash(pairs) == hashlib.blake2b(blob, digest_size=16).hexdigest()


def _row(record: PreferenceRecord) -> dict:
    """The RECORD_SCHEMA row a record stands for, built field by field (meta as sorted JSON)."""
    return {**record.model_dump(), "meta": json.dumps(record.meta, ensure_ascii=False, sort_keys=True)}


def test_records_to_table_equals_the_rows_it_stands_for():
    records = [_rec(), _rec(meta={"model": "x", "n": 2}, chosen_score=4.5, rejected_score=None,
                            prompt=[{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}])]
    table = records_to_table(records)
    assert table.schema == RECORD_SCHEMA
    assert table.to_pylist() == [_row(r) for r in records]
    assert [PreferenceRecord.model_validate({**row, "meta": json.loads(row["meta"])}) for row in table.to_pylist()] == records


def test_id_given_must_match():
    with pytest.raises(ValidationError) as exc:
        _rec(id="deadbeef")
    assert _reason(exc.value) == "id_mismatch"
    assert _rec(id=_rec().id).id == _rec().id


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ({"chosen": [{"role": "assistant", "content": "   "}]}, "empty_content"),
        ({"prompt": []}, "empty_prompt"),
        ({"rejected": []}, "empty_answer"),
        ({"prompt": [{"role": "assistant", "content": "x"}]}, "prompt_not_ending_with_user"),
        ({"chosen": [{"role": "user", "content": "x"}]}, "answer_not_starting_with_assistant"),
        ({"rejected": [{"role": "assistant", "content": "Hello!"}]}, "identical_answers"),
        (
            {"prompt": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                        {"role": "user", "content": "c"}]},
            "system_not_first",
        ),
        ({"prompt": [{"role": "robot", "content": "x"}]}, "literal_error"),
    ],
)
def test_validators_give_reason_codes(override, reason):
    with pytest.raises(ValidationError) as exc:
        _rec(**override)
    assert _reason(exc.value) == reason


@given(st.integers(0, 50), st.dictionaries(st.sampled_from(["a", "b", "c"]), st.integers(0, 20)))
def test_counts_must_add_up(kept, dropped):
    read = kept + sum(dropped.values())
    assert Counts(read=read, kept=kept, dropped=dropped).read == read
    with pytest.raises(ValidationError):
        Counts(read=read + 1, kept=kept, dropped=dropped)


def test_manifest_round_trip_and_guards(tmp_path):
    m = Manifest(stage="ingest", package_version="0", config={"x": 1}, counts=Counts(read=2, kept=2))
    m.write(tmp_path)
    assert Manifest.read(tmp_path, stages=("ingest",)) == m
    with pytest.raises(UserError, match="expected the output of curate"):
        Manifest.read(tmp_path, stages=("curate",))
    raw = json.loads((tmp_path / "manifest.json").read_text())
    raw["schema_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match="schema version 99"):
        Manifest.read(tmp_path)
    with pytest.raises(UserError, match="no manifest.json"):
        Manifest.read(tmp_path.parent)
