"""What every raw format shares: the converter interface, format-level reason codes, and the
helpers that turn raw values into `{"role", "content"}` messages with precise reasons.

A format turns ONE raw row (a dict) into *candidates*: dicts with `prompt`, `chosen`, `rejected`
(lists of messages) and optionally `chosen_score`, `rejected_score`, `meta`. The stage adds
provenance and validates each candidate as a `PreferenceRecord`; a row that cannot be converted
raises `FormatError` with a reason code and is quarantined. Formats that pair several answers of
one row (UltraFeedback, Nectar, OASST trees, …) give several candidates, and may also give
`Skipped` notes for parts of the row they leave out on purpose (a deleted message, an unrated
answer), which the manifest counts by reason. Formats whose pairs span several rows (OASST flat
message rows, HelpSteer2 ratings) set `group_by`: the stage hands them one group of consecutive
rows at a time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Reason codes for rows that are not even candidate records. Together with the record validators'
# codes (schemas.records) and the readers' (invalid_json, …) they are what quarantine.jsonl holds.
MISSING_FIELD = "missing_field"
NULL_VALUE = "null_value"
WRONG_TYPE = "wrong_type"
UNSUPPORTED_ROLE = "unsupported_role"
UNSUPPORTED_CONTENT = "unsupported_content"
INVALID_LABEL = "invalid_label"  # a preference label that is not one of the format's values

Candidate = dict[str, Any]
Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Skipped:
    """Part of a row left out on purpose; counted in the manifest's stats under `reason`."""

    reason: str
    count: int = 1

STANDARD_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}

PairingRule = Literal["best-vs-worst", "best-vs-rest", "all", "adjacent"]


class FormatError(Exception):
    """A raw row that cannot become a candidate: `reason` is the quarantine reason code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class FormatOptions(BaseModel):
    """Options that change how rows are converted (part of IngestConfig, so in the manifest)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    column_map: dict[str, str] = Field({}, description="Generic table: field=column,… (fields: system, prompt, chosen, "
                                       "rejected, chosen_score, rejected_score); implies --format tabular.")
    pairs: PairingRule = Field("best-vs-worst", description="Several scored answers per prompt: how they become pairs "
                               "(prefdata.pairing).")
    min_margin: float = Field(0.0, ge=0, description="Keep pairs whose scores differ by at least this.")
    score: str | None = Field(None, description="UltraFeedback: mean-aspects (default), overall, aspect:NAME. "
                              "HelpSteer2: helpfulness (default), weighted.")
    min_score_ratio: float | None = Field(None, ge=1, description="SHP: keep pairs with this score ratio or more.")
    lang: str | None = Field(None, description="OASST: only messages in this language (e.g. en).")
    label: Literal["better", "safer"] = Field("better", description="PKU-SafeRLHF: which preference is the label.")
    keep_truncated: bool = Field(False, description="Judged samples: also pair answers that generation cut at --max-new-tokens.")

    @field_validator("column_map", mode="before")
    @classmethod
    def _parse_column_map(cls, value: Any) -> Any:
        """`system=system,prompt=question` on the command line; a mapping in YAML."""
        if not isinstance(value, str):
            return value
        from prefdata.ingest import parse_column_map  # it checks the names against the tabular format's fields

        return parse_column_map(value)


class Format:
    """One raw format. Subclasses set `name`, `columns` (all present in a row of this format) and
    `convert`; `looks_like` adds checks on the values where column names alone are not enough."""

    name: ClassVar[str]
    columns: ClassVar[frozenset[str]]
    auto_detect: ClassVar[bool] = True
    # For pairs that span rows: consecutive rows with equal values in this column are one group,
    # given to `convert` as {"rows": [row, …]} (the input must keep a group's rows together).
    group_by: ClassVar[str | None] = None

    def __init__(self, options: FormatOptions, columns: frozenset[str]) -> None:
        """`columns`: the columns seen in the source's first rows (optional ones decide the layout)."""
        self.options = options

    @classmethod
    def looks_like(cls, columns: frozenset[str], first: dict[str, Any]) -> bool:
        """Whether a source whose first rows have `columns` (and whose first row is `first`) is
        in this format."""
        return cls.columns <= columns

    def required_columns(self) -> frozenset[str]:
        """Columns the user named (`--map`): a source whose first rows lack one stops the run, as
        a typo in the map would otherwise quarantine every row. A forced `--format` names no
        columns: rows without its columns are quarantined (missing_field) like any bad row."""
        return frozenset()

    def convert(self, row: dict[str, Any]) -> Iterable[Candidate | Skipped]:
        raise NotImplementedError


def field(row: dict[str, Any], key: str, where: str = "") -> Any:
    """`row[key]`, with missing_field / null_value instead of KeyError / None."""
    try:
        value = row[key]
    except KeyError:
        raise FormatError(MISSING_FIELD, f"missing field '{where}{key}'") from None
    if value is None:
        raise FormatError(NULL_VALUE, f"field '{where}{key}' is null")
    return value


def text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise FormatError(WRONG_TYPE, f"'{where}' must be a string, got {type(value).__name__}")
    return value


def as_list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise FormatError(WRONG_TYPE, f"'{where}' must be a list, got {type(value).__name__}")
    return value


def as_dict(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FormatError(WRONG_TYPE, f"'{where}' must be an object, got {type(value).__name__}")
    return value


def message(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def messages(
    value: Any,
    where: str,
    roles: dict[str, str] = STANDARD_ROLES,
    role_key: str = "role",
    content_key: str = "content",
    content_of: Any = None,
) -> Messages:
    """A list of `{role_key: …, content_key: …}` objects → messages, with each role mapped through
    `roles` (a role not in it is unsupported_role) and each content read by `content_of` (default:
    it must be a string)."""
    out = []
    for i, item in enumerate(as_list(value, where)):
        here = f"{where}[{i}]"
        item = as_dict(item, here)
        raw_role = text(field(item, role_key, f"{here}."), f"{here}.{role_key}")
        role = roles.get(raw_role)
        if role is None:
            raise FormatError(
                UNSUPPORTED_ROLE, f"'{here}.{role_key}' is '{raw_role}'; this format knows {', '.join(roles)}"
            )
        content = field(item, content_key, f"{here}.")
        out.append(message(role, content_of(content, here) if content_of else text(content, f"{here}.{content_key}")))
    return out


def split_common_prefix(chosen: Messages, rejected: Messages) -> tuple[Messages, Messages, Messages]:
    """Implicit prompt for conversations: the longest shared run of messages, cut back so that it
    ends with a user turn (the record's prompt must; the answers then start with the assistant)."""
    shared = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        shared += 1
    while shared and chosen[shared - 1]["role"] != "user":
        shared -= 1
    return chosen[:shared], chosen[shared:], rejected[shared:]


def split_common_text(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Implicit prompt for plain strings: the longest shared prefix, cut back to a word boundary
    (never mid-word), so "The sky is blue" / "The sky is bluish" → "The sky is", "blue", "bluish"."""
    shared = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        shared += 1
    while shared and not (_boundary(chosen, shared) and _boundary(rejected, shared)):
        shared -= 1
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _boundary(s: str, i: int) -> bool:
    """Whether cutting `s` at `i` leaves whole words on both sides."""
    return i == len(s) or s[i].isspace() or s[i - 1].isspace()


def answer(content: str) -> Messages:
    return [message("assistant", content)]


def text_parts(content: Any, where: str, text_key: str = "text") -> str:
    """Message content that is a string or a list of typed parts ({"type": "text", text_key: …});
    text parts are joined, any other part (image, audio, …) is unsupported_content."""
    if isinstance(content, str):
        return content
    pieces = []
    for i, part in enumerate(as_list(content, f"{where}.content")):
        here = f"{where}.content[{i}]"
        part = as_dict(part, here)
        kind = field(part, "type", f"{here}.")
        if kind != "text":
            raise FormatError(UNSUPPORTED_CONTENT, f"'{here}' is a '{kind}' part; only text is supported")
        pieces.append(text(field(part, text_key, f"{here}."), f"{here}.{text_key}"))
    return "".join(pieces)
