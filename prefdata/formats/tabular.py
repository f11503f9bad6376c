"""Generic tabular rows with a column map (`--map system=system,prompt=question`): any flat table
(CSV export, parquet, JSONL) whose columns hold the prompt and the two answers, or the prompt, one
completion and its feedback label (binary feedback exports: thumbs up / down, KTO data).

Pair fields: prompt, chosen, rejected (required), system, chosen_score, rejected_score. Unpaired
fields: prompt, completion, label (required), system, score; the layout is unpaired when the map
names `completion` or `label`, or when the table has a `completion` column and no `chosen`. Labels
are read with the feedback vocabulary of `prefdata.formats.base.parse_label`. A field not in the
map reads the column of its own name (so orca_dpo_pairs needs only `prompt=question`; its `system`
column is read without being named). A text prompt is one user message, a text answer one
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
    field,
    message,
    parse_label,
    text,
    turns,
)
from schemas.errors import UserError

PAIR_FIELDS = ("prompt", "chosen", "rejected", "chosen_score", "rejected_score")
UNPAIRED_FIELDS = ("prompt", "completion", "label", "score")
MAPPABLE_FIELDS = ("system", *PAIR_FIELDS, *UNPAIRED_FIELDS[1:])


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
        named = set(options.column_map)
        self.unpaired_layout = bool(named & {"completion", "label"}) or (
            "completion" in columns and "chosen" not in columns and not named & {"chosen", "rejected"})
        fields = UNPAIRED_FIELDS if self.unpaired_layout else PAIR_FIELDS
        foreign = named - set(fields) - {"system"}
        if foreign:
            layout = "unpaired (prompt, completion, label, score)" if self.unpaired_layout else \
                "pair (prompt, chosen, rejected, chosen_score, rejected_score)"
            raise UserError(f"--map: {', '.join(sorted(foreign))} do not belong to the {layout} layout the map selects")
        required, optional = fields[:3], ("system", *fields[3:])
        self.column_of = {
            **{f: f for f in required},
            **{f: f for f in optional if f in columns},
            **options.column_map,
        }
        self.rated = not self.unpaired_layout and all(f in self.column_of for f in fields[3:])

    def required_columns(self) -> frozenset[str]:
        return frozenset(self.column_of.values())

    def convert(self, row: dict[str, Any]) -> list[Candidate]:
        cols = self.column_of
        prompt = turns(field(row, cols["prompt"]), cols["prompt"], "user")
        if "system" in cols:
            system = row.get(cols["system"])
            if system is not None and text(system, cols["system"]).strip():
                prompt = [message("system", system), *prompt]
        candidate: Candidate = {"prompt": prompt}
        if self.unpaired_layout:
            candidate["completion"] = turns(field(row, cols["completion"]), cols["completion"], "assistant")
            candidate["label"] = parse_label(field(row, cols["label"]), cols["label"])
            scores = ("score",)
        else:
            candidate["chosen"] = turns(field(row, cols["chosen"]), cols["chosen"], "assistant")
            candidate["rejected"] = turns(field(row, cols["rejected"]), cols["rejected"], "assistant")
            scores = ("chosen_score", "rejected_score")
        for score in scores:
            if score in cols:
                candidate[score] = _score(row.get(cols[score]), cols[score])
        return [candidate]
