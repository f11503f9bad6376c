"""Generic tabular rows with a column map (`--map system=system,prompt=question`): any flat table
(CSV export, parquet, JSONL) whose columns hold the prompt and the two answers, or the prompt, one
completion and its feedback label (binary feedback exports: thumbs up / down, KTO data).

Pair fields: prompt, chosen, rejected (required), system, chosen_score, rejected_score. Unpaired
fields: prompt, completion, label (required), system, score; the layout is unpaired when the map
names `completion` or `label`, or when the table has a `completion` column and no `chosen`. Labels
are read with the feedback vocabulary of `prefdata.formats.base.parse_label`; a label column whose
first rows hold numbers other than 0/1 is refused (a rating: map it as `score`). An unpaired table
with a score and no label column (a ratings-only export) is rated: under `--unpaired
--score-threshold T` each row is labelled score >= T; with both, the label wins and the score is
kept. A field not in the
map reads the column of its own name (so orca_dpo_pairs needs only `prompt=question`; its `system`
column is read without being named). A text prompt is one user message, a text answer one
assistant message; message lists are read as conversations. An empty or null system column means
no system message. Never auto-detected: which column is the prompt is the user's to say.
"""

from __future__ import annotations

import math
from typing import Any

from prefdata.formats.base import (
    UNRATED,
    WRONG_TYPE,
    Candidate,
    Format,
    FormatError,
    FormatOptions,
    check_label_column,
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
    """A score cell as a number, or None where it is missing: empty, or NaN (how pandas writes a
    missing value; a threshold would read it as "below") or another non-finite number."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        score = float(value)
    else:
        try:
            score = float(text(value, where))
        except ValueError:
            raise FormatError(WRONG_TYPE, f"'{where}' must be a number, got {value!r}") from None
    return score if math.isfinite(score) else None


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
        # a ratings-only export (completion and score, no label column; a column named `label` mapped
        # as the score is none): each row labelled by --score-threshold
        has_label = "label" in named or "label" in columns and "label" not in options.column_map.values()
        self.scored = self.unpaired_layout and not has_label and ("score" in named or "score" in columns)
        if self.scored:
            required = ("prompt", "completion", "score")
            if not options.unpaired:
                raise UserError("--map: completion and score with no label column: rows are labelled by their score; "
                                "add --unpaired --score-threshold T (a score of T or more is desirable), or map label=")
        self.column_of = {
            **{f: f for f in required},
            **{f: f for f in optional if f in columns},
            **options.column_map,
        }
        self.rated = self.scored or not self.unpaired_layout and all(f in self.column_of for f in fields[3:])

    def check_rows(self, source: str, rows: list[dict[str, Any]]) -> None:
        if self.unpaired_layout and not self.scored:
            check_label_column(source, rows, self.column_of["label"])

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
            if self.scored:
                candidate["label"] = self._scored_label(row.get(cols["score"]), cols["score"])
            else:
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

    def _scored_label(self, value: Any, where: str) -> bool:
        score = _score(value, where)
        if score is None:
            raise FormatError(UNRATED, f"'{where}' is empty or not a finite number: --score-threshold cannot label an "
                                      "unrated completion")
        assert self.options.score_threshold is not None  # ingest refuses a rated source without one
        return score >= self.options.score_threshold
