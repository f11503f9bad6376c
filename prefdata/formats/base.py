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

Unpaired candidates (KTO data) have `prompt`, `completion`, `label` (True: desirable) and optionally
`score`, `meta`; the stage validates them as `UnpairedRecord`s. Formats whose rows hold one labelled
completion (`unpaired_layout`) give them directly; under `--unpaired` every other format's pairs
are split by `Format.candidates` into a desirable chosen and an undesirable rejected completion,
or, for formats whose answers carry absolute ratings (`rated`), into completions labelled by
`--score-threshold`. Rated formats with several answers per prompt label every rated answer
(prefdata.pairing.scored_candidates), not only the paired ones.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.errors import UserError
from schemas.records import PAIRED, UNPAIRED

# Reason codes for rows that are not even candidate records. Together with the record validators'
# codes (schemas.records) and the readers' (invalid_json, …) they are what quarantine.jsonl holds.
MISSING_FIELD = "missing_field"
NULL_VALUE = "null_value"
WRONG_TYPE = "wrong_type"
UNSUPPORTED_ROLE = "unsupported_role"
UNSUPPORTED_CONTENT = "unsupported_content"
INVALID_LABEL = "invalid_label"  # a preference label that is not one of the format's values
NON_BINARY_LABEL = "non_binary_label"  # a number other than 0/1 in a feedback label column: a rating (ingest refuses the source)
UNRATED = "unrated"  # an answer without a score where a score decides (pairing, --score-threshold)

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
                                       "rejected, chosen_score, rejected_score; unpaired feedback: completion, label, "
                                       "score); implies --format tabular.")
    pairs: PairingRule = Field("best-vs-worst", description="Several scored answers per prompt: how they become pairs "
                               "(prefdata.pairing).")
    min_margin: float = Field(0.0, ge=0, description="Keep pairs whose scores differ by at least this.")
    score: str | None = Field(None, description="UltraFeedback: mean-aspects (default), overall, aspect:NAME. "
                              "HelpSteer2: helpfulness (default), weighted.")
    min_score_ratio: float | None = Field(None, ge=1, description="SHP: keep pairs with this score ratio or more.")
    lang: str | None = Field(None, description="OASST: only messages in this language (e.g. en).")
    label: Literal["better", "safer"] = Field("better", description="PKU-SafeRLHF: which preference is the label.")
    keep_truncated: bool = Field(False, description="Judged samples: also pair answers that generation cut at --max-new-tokens.")
    unpaired: bool = Field(False, description="Write unpaired records (KTO data): each pair's chosen answer a desirable "
                           "completion, its rejected one an undesirable one; rated sources give one record per rated "
                           "answer, labelled by --score-threshold.")
    score_threshold: float | None = Field(None, description="--unpaired on a rated source (UltraFeedback, HelpSteer2, "
                                          "judged, scored --map columns): an answer scored at least this is desirable.")

    @field_validator("column_map", mode="before")
    @classmethod
    def _parse_column_map(cls, value: Any) -> Any:
        """`system=system,prompt=question` on the command line; a mapping in YAML."""
        if not isinstance(value, str):
            return value
        from prefdata.ingest import parse_column_map  # it checks the names against the tabular format's fields

        return parse_column_map(value)

    @model_validator(mode="after")
    def _threshold_needs_unpaired(self) -> FormatOptions:
        if self.score_threshold is not None and not self.unpaired:
            raise UserError("--score-threshold labels rated answers for --unpaired; add --unpaired or drop it")
        return self


class Format:
    """One raw format. Subclasses set `name`, `columns` (all present in a row of this format) and
    `convert`; `looks_like` adds checks on the values where column names alone are not enough."""

    name: ClassVar[str]
    columns: ClassVar[frozenset[str]]
    auto_detect: ClassVar[bool] = True
    # For pairs that span rows: consecutive rows with equal values in this column are one group,
    # given to `convert` as {"rows": [row, …]} (the input must keep a group's rows together).
    group_by: ClassVar[str | None] = None
    # Rows that hold one labelled completion each (TRL's unpaired layout): always unpaired records.
    unpaired_layout = False
    # Answers carry absolute scores (ratings, judge scores): under --unpaired, --score-threshold labels them.
    rated = False

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

    def check_rows(self, source: str, rows: list[dict[str, Any]]) -> None:
        """What the source's first parsed rows must hold beyond its columns, checked once per source
        before any row is converted (a UserError stops the run); nothing by default."""

    def convert(self, row: dict[str, Any]) -> Iterable[Candidate | Skipped]:
        raise NotImplementedError

    @property
    def kind(self) -> str:
        """The records this format gives with these options: `paired` or `unpaired`."""
        return UNPAIRED if self.unpaired_layout or self.options.unpaired else PAIRED

    def candidates(self, row: dict[str, Any]) -> Iterable[Candidate | Skipped]:
        """What the stage validates: `convert(row)`, its pairs split into labelled completions
        when the records are unpaired."""
        items = self.convert(row)
        if self.kind == PAIRED or self.unpaired_layout:
            return items
        return _split_pairs(items, self.options.score_threshold if self.rated else None)


def _split_pairs(items: Iterable[Candidate | Skipped], threshold: float | None) -> Iterator[Candidate | Skipped]:
    """Each pair candidate as two unpaired ones: chosen desirable, rejected undesirable, or, with a
    `threshold` (rated formats), each answer desirable when its score reaches it (an answer
    without a score is `unrated`). Unpaired candidates and notes pass through."""
    for item in items:
        if isinstance(item, Skipped) or "completion" in item:
            yield item
            continue
        for side, label in (("chosen", True), ("rejected", False)):
            score = item.get(f"{side}_score")
            if threshold is not None:
                if score is None:
                    yield Skipped(UNRATED)
                    continue
                label = score >= threshold
            yield {"prompt": item["prompt"], "completion": item[side], "label": label, "score": score,
                   "meta": item.get("meta", {})}


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


def turns(value: Any, where: str, role: str) -> Messages:
    """A text (one `role` message) or a list of messages (a conversation)."""
    if isinstance(value, str):
        return [message(role, value)]
    if isinstance(value, list):
        return messages(value, where)
    raise FormatError(WRONG_TYPE, f"'{where}' must be a string or a list of messages, got {type(value).__name__}")


# Binary feedback labels, compared case-folded with spaces and hyphens read as underscores, emoji
# variation selectors and skin tones removed. Numbers are labels only in a binary column: on a
# -1/0/+1 scale 0 is neutral, not "down", and on 1-5 stars 1 is the worst, so reading 0/1 there
# would mislabel silently. A source whose first rows hold other numbers in its label column is
# refused at once (`check_label_column`), and one whose later rows do is refused when it has been
# read (`non_binary_label`: its 0s and 1s may already have been read as labels; nothing is written).
DESIRABLE_LABELS = frozenset({"true", "t", "yes", "y", "1", "up", "thumbs_up", "thumbsup", "👍", "positive", "pos",
                              "good", "like", "liked", "desirable", "accept", "accepted"})
UNDESIRABLE_LABELS = frozenset({"false", "f", "no", "n", "0", "down", "thumbs_down", "thumbsdown", "👎", "negative",
                                "neg", "bad", "dislike", "disliked", "undesirable", "reject", "rejected"})
_EMOJI_MODIFIERS = dict.fromkeys([0xFE0F, *range(0x1F3FB, 0x1F400)])
SCORE_FIX = "map the column as score= with --unpaired --score-threshold T"


def _number_label(value: Any) -> bool | None:
    """A numeric label (a number, not a boolean, or text that reads as a finite one: CSV cells) →
    True for 0/1 (0.0/1.0), False for any other number, signed text ("+1", "-0") included: it comes
    from a signed scale. None when the value is no number."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
        if not math.isfinite(number):
            return None
        return number in (0, 1) and value.strip()[:1] not in ("+", "-")
    return value in (0, 1) if isinstance(value, int) or math.isfinite(value) else None


def _shown(value: Any) -> str:
    return repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."


def parse_label(value: Any, where: str) -> bool:
    """A binary feedback label → True (desirable) / False; anything else is invalid_label. Booleans,
    the numbers 1 and 0 (any other number names the score= fix), and the words of
    DESIRABLE_LABELS / UNDESIRABLE_LABELS."""
    if isinstance(value, bool):
        return value
    if not isinstance(value, (int, float, str)):
        raise FormatError(WRONG_TYPE, f"'{where}' must be a label (a boolean, 1/0 or a word), got {type(value).__name__}")
    binary = _number_label(value)
    if binary is False:
        raise FormatError(NON_BINARY_LABEL, f"'{where}' is {_shown(value)}: a number other than 0/1 is a rating, not a "
                          f"binary label; {SCORE_FIX}")
    if binary:
        return float(value) == 1
    if isinstance(value, str):
        word = unicodedata.normalize("NFKC", value).translate(_EMOJI_MODIFIERS).strip().casefold()
        word = word.replace("-", "_").replace(" ", "_")
        if word in DESIRABLE_LABELS or word in UNDESIRABLE_LABELS:
            return word in DESIRABLE_LABELS
    raise FormatError(INVALID_LABEL, f"'{where}' is {_shown(value)}: not a feedback label (true/false, 1/0, up/down, "
                      "thumbs_up/thumbs_down, 👍/👎, good/bad, like/dislike, …; docs/ingest-and-formats.md)")


def check_label_column(source: str, rows: list[dict[str, Any]], column: str) -> None:
    """Per source, not per row: a label column is read as numbers only when it is binary. First
    rows whose `column` holds numbers other than 0/1 (a -1/0/+1 scale, 1-5 stars) stop the run in
    one line naming the score= fix, before a 0 or a 1 of such a scale is read as a label."""
    values = (row.get(column) for row in rows if isinstance(row, dict))
    others = list(dict.fromkeys(_shown(v) for v in values if _number_label(v) is False))
    if others:
        shown = ", ".join(others[:4]) + (", …" if len(others) > 4 else "")
        raise UserError(f"{source}: label column '{column}' holds numbers other than 0/1 ({shown}): a rating or a "
                        f"-1/0/+1 scale is not a binary label, and its 0s and 1s would be misread; {SCORE_FIX} "
                        f"(--map …,score={column})")


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
