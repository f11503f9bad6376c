"""Generic tabular rows with a column map (`--map system=system,prompt=question`): any flat table
(CSV export, parquet, JSONL) whose columns hold the prompt and the two answers.

Fields: prompt, chosen, rejected (required), system, chosen_score, rejected_score. A field not in
the map reads the column of its own name (so orca_dpo_pairs needs only `prompt=question`; its
`system` column is read without being named). A text prompt is one user message, a text answer one
assistant message; message lists are read as conversations. An empty or null system column means
no system message. Never auto-detected: which column is the prompt is the user's to say.
"""

from __future__ import annotations

from typing import Any

from prefdata.formats.base import (
    WRONG_TYPE,
    Candidate,
    Format,
    FormatError,
    FormatOptions,
    Messages,
    field,
    message,
    messages,
    text,
)

REQUIRED_FIELDS = ("prompt", "chosen", "rejected")
OPTIONAL_FIELDS = ("system", "chosen_score", "rejected_score")
MAPPABLE_FIELDS = REQUIRED_FIELDS + OPTIONAL_FIELDS


def _turns(value: Any, where: str, role: str) -> Messages:
    if isinstance(value, str):
        return [message(role, value)]
    if isinstance(value, list):
        return messages(value, where)
    raise FormatError(WRONG_TYPE, f"'{where}' must be a string or a list of messages, got {type(value).__name__}")


def _score(value: Any, where: str) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    try:
        return float(text(value, where))
    except ValueError:
        raise FormatError(WRONG_TYPE, f"'{where}' must be a number, got {value!r}") from None


class TabularFormat(Format):
    name = "tabular"
    columns = frozenset()
    auto_detect = False

    def __init__(self, options: FormatOptions, columns: frozenset[str]) -> None:
        super().__init__(options, columns)
        self.column_of = {
            **{f: f for f in REQUIRED_FIELDS},
            **{f: f for f in OPTIONAL_FIELDS if f in columns},
            **options.column_map,
        }

    def required_columns(self) -> frozenset[str]:
        return frozenset(self.column_of.values())

    def convert(self, row: dict[str, Any]) -> list[Candidate]:
        cols = self.column_of
        prompt = _turns(field(row, cols["prompt"]), cols["prompt"], "user")
        if "system" in cols:
            system = row.get(cols["system"])
            if system is not None and text(system, cols["system"]).strip():
                prompt = [message("system", system), *prompt]
        candidate: Candidate = {
            "prompt": prompt,
            "chosen": _turns(field(row, cols["chosen"]), cols["chosen"], "assistant"),
            "rejected": _turns(field(row, cols["rejected"]), cols["rejected"], "assistant"),
        }
        for score in ("chosen_score", "rejected_score"):
            if score in cols:
                candidate[score] = _score(row.get(cols[score]), cols[score])
        return [candidate]
