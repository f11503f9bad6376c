"""The records: the contract between ingest, curate and tokenize.

A preference record is one comparison: a conversation (`prompt`) and two continuations of it, the
preferred one (`chosen`) and the other (`rejected`). An unpaired record is one continuation
(`completion`) with a binary label, desirable or not (a thumbs up or down: KTO's data). Text is
normalised once, here, so every later stage can compare strings byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from typing import Annotated, Any, Literal

import orjson
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

Role = Literal["system", "user", "assistant"]

# Reason codes a record can fail validation with. Ingest turns them into quarantine reasons, so
# they are part of the contract: a user greps quarantine.jsonl for them.
EMPTY_CONTENT = "empty_content"
EMPTY_PROMPT = "empty_prompt"
EMPTY_ANSWER = "empty_answer"
PROMPT_NOT_ENDING_WITH_USER = "prompt_not_ending_with_user"
ANSWER_NOT_STARTING_WITH_ASSISTANT = "answer_not_starting_with_assistant"
SYSTEM_NOT_FIRST = "system_not_first"
IDENTICAL_ANSWERS = "identical_answers"
ID_MISMATCH = "id_mismatch"


def normalize_text(text: str) -> str:
    """BOM stripped, CRLF/CR → LF, Unicode NFC, surrounding whitespace trimmed."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = text.replace("\ufeff", "")
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    return text.strip()


def _stable_hash(payload: Any) -> str:
    # orjson writes the bytes of json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    # (tested), which the ids were first defined with, at a tenth of the cost.
    return hashlib.blake2b(orjson.dumps(payload), digest_size=16).hexdigest()


def _pairs(messages: list[Message] | list[dict[str, str]]) -> list[list[str]]:
    return [[m["role"], m["content"]] if isinstance(m, dict) else [m.role, m.content] for m in messages]


def prompt_hash(prompt: list[Message] | list[dict[str, str]]) -> str:
    """Hash of the normalised prompt: the same conversation gets the same id on any machine."""
    return _stable_hash(_pairs(prompt))


def _pair_id(prompt: list[list[str]], chosen: list[list[str]], rejected: list[list[str]]) -> str:
    """Content hash of the pair. Scores and provenance are left out: the same comparison from two
    dumps is the same record."""
    return _stable_hash([prompt, chosen, rejected])


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Role
    content: str

    @field_validator("content")
    @classmethod
    def _normalise(cls, content: str) -> str:
        content = normalize_text(content)
        if not content:
            raise PydanticCustomError(EMPTY_CONTENT, "message content is empty after normalisation")
        return content


MetaValue = str | int | float | bool | None


def _check_prompt(prompt: list[Message]) -> None:
    if not prompt:
        raise PydanticCustomError(EMPTY_PROMPT, "prompt has no messages")
    if prompt[-1].role != "user":
        raise PydanticCustomError(
            PROMPT_NOT_ENDING_WITH_USER,
            "prompt must end with a user turn, got {role}",
            {"role": prompt[-1].role},
        )
    if any(m.role == "system" for m in prompt[1:]):
        raise PydanticCustomError(SYSTEM_NOT_FIRST, "a system message may only open the prompt")


def _check_answer(name: str, answer: list[Message]) -> None:
    if not answer:
        raise PydanticCustomError(EMPTY_ANSWER, "{name} has no messages", {"name": name})
    if answer[0].role != "assistant":
        raise PydanticCustomError(
            ANSWER_NOT_STARTING_WITH_ASSISTANT,
            "{name} must start with an assistant turn, got {role}",
            {"name": name, "role": answer[0].role},
        )


def _fill_or_check_id(record: BaseModel, expected: str) -> None:
    if not record.id:
        object.__setattr__(record, "id", expected)
    elif record.id != expected:
        raise PydanticCustomError(ID_MISMATCH, "id does not match the record's content")


# A rating or judge score: NaN orders nothing and inf no margin, so neither reaches a record.
Score = Annotated[float, Field(allow_inf_nan=False)]


class PreferenceRecord(BaseModel):
    """One validated comparison. `id` is filled in from the content when not given, and checked
    when given (a record edited by hand must not keep its old id)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = ""
    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    source: str
    source_format: str
    source_row: int
    chosen_score: Score | None = None
    rejected_score: Score | None = None
    meta: dict[str, MetaValue] = Field(default_factory=dict)  # a {} default would be deep-copied per record

    @model_validator(mode="after")
    def _check_shape(self) -> PreferenceRecord:
        _check_prompt(self.prompt)
        _check_answer("chosen", self.chosen)
        _check_answer("rejected", self.rejected)
        prompt, chosen, rejected = _pairs(self.prompt), _pairs(self.chosen), _pairs(self.rejected)
        if chosen == rejected:
            raise PydanticCustomError(IDENTICAL_ANSWERS, "chosen and rejected are identical")
        _fill_or_check_id(self, _pair_id(prompt, chosen, rejected))
        return self


class UnpairedRecord(BaseModel):
    """One completion with a binary label: `label` True is desirable (a thumbs up), False
    undesirable. Validated like a pair's answers; `id` is the content hash of prompt, completion
    and label (the same completion labelled both ways is two records, which curate reconciles)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = ""
    prompt: list[Message]
    completion: list[Message]
    label: bool
    source: str
    source_format: str
    source_row: int
    score: Score | None = None  # the rating the label came from, when the source has one
    meta: dict[str, MetaValue] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_shape(self) -> UnpairedRecord:
        _check_prompt(self.prompt)
        _check_answer("completion", self.completion)
        _fill_or_check_id(self, _stable_hash([_pairs(self.prompt), _pairs(self.completion), self.label]))
        return self


# The record files each record-set stage writes, and the split each holds (an ingest output is not
# split yet: all of it trains). Every stage that reads record sets finds them here.
RECORD_FILES: dict[str, dict[str, str]] = {
    "ingest": {"records.parquet": "train"},
    "curate": {"train.parquet": "train", "eval.parquet": "eval"},
}

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES_TYPE = pa.list_(MESSAGE_TYPE)

PAIRED, UNPAIRED = "paired", "unpaired"
# Each kind's answer columns: a pair's two, an unpaired record's completion (its label beside it).
ANSWERS = {PAIRED: ("chosen", "rejected"), UNPAIRED: ("completion",)}


def _record_columns(middle: list[tuple[str, pa.DataType]], scores: list[str]) -> pa.Schema:
    """A record file's columns: id, prompt, the kind's own, provenance, its scores, meta."""
    return pa.schema([("id", pa.string()), ("prompt", MESSAGES_TYPE), *middle, ("source", pa.string()),
                      ("source_format", pa.string()), ("source_row", pa.int64()),
                      *((name, pa.float64()) for name in scores), ("meta", pa.string())])


# records.parquet, train.parquet, eval.parquet, pairs and unpaired. Column order is the field
# order of PreferenceRecord / UnpairedRecord above.
RECORD_SCHEMA = _record_columns([(name, MESSAGES_TYPE) for name in ANSWERS[PAIRED]], ["chosen_score", "rejected_score"])
UNPAIRED_RECORD_SCHEMA = _record_columns([("completion", MESSAGES_TYPE), ("label", pa.bool_())], ["score"])


def record_kind(names: list[str]) -> str:
    """`paired` or `unpaired`, from a record file's column names (a curated file has more)."""
    return UNPAIRED if ANSWERS[UNPAIRED][0] in names else PAIRED


def record_schema(kind: str) -> pa.Schema:
    return UNPAIRED_RECORD_SCHEMA if kind == UNPAIRED else RECORD_SCHEMA


def unpaired_to_table(records: list[UnpairedRecord]) -> pa.Table:
    """UnpairedRecords → an UNPAIRED_RECORD_SCHEMA table."""
    return _to_table(records, UNPAIRED_RECORD_SCHEMA)


def records_to_table(records: list[PreferenceRecord]) -> pa.Table:
    """Records → a RECORD_SCHEMA table."""
    return _to_table(records, RECORD_SCHEMA)


def _to_table(records: list[Any], schema: pa.Schema) -> pa.Table:
    """Column by column from the records' attributes (no per-record dict): messages through
    `_messages_array`, `meta` as JSON text, the rest as the schema types them."""
    columns = {}
    for field in schema:
        values = [getattr(r, field.name) for r in records]
        if field.type == MESSAGES_TYPE:
            columns[field.name] = _messages_array(values)
        elif field.name == "meta":
            columns[field.name] = pa.array([_meta_json(m) for m in values], pa.string())
        else:
            columns[field.name] = pa.array(values, field.type)
    return pa.Table.from_pydict(columns, schema=schema)


def _meta_json(meta: dict[str, Any]) -> str:
    # A JSON string, not a map column: polars has no map type.
    return json.dumps(meta, ensure_ascii=False, sort_keys=True) if meta else "{}"


def _messages_array(conversations: list[list[Message]]) -> pa.Array:
    """list<struct<role, content>> from flat role/content columns and offsets: about half the
    cost of letting Arrow walk nested Python dicts (measured on HH records)."""
    offsets, roles, contents = [0], [], []
    for conversation in conversations:
        for m in conversation:
            roles.append(m.role)
            contents.append(m.content)
        offsets.append(len(roles))
    structs = pa.StructArray.from_arrays([pa.array(roles, pa.string()), pa.array(contents, pa.string())],
                                         fields=list(MESSAGE_TYPE))
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), structs)
