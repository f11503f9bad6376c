"""Stanford Human Preferences (SHP) and data in its schema.

    {"history": post, "human_ref_A": comment, "human_ref_B": comment, "labels": 1 | 0,
     "score_A": int?, "score_B": int?, "score_ratio": float?, "post_id": …, "domain": …}

`labels` = 1 means A is preferred, 0 means B. The history is the prompt: one user turn, or, for
HH data converted to this schema ("HUMAN: …\\n\\nASSISTANT: …"), the turns it holds. Upvote scores
go into chosen_score / rejected_score. `--min-score-ratio R` keeps pairs whose score ratio
(`score_ratio`, else the larger score over the smaller) is at least R; the SHP authors recommend 2.
"""

from __future__ import annotations

from typing import Any

from prefdata.formats.base import INVALID_LABEL, Candidate, Format, FormatError, answer, field, message, text
from prefdata.formats.hh import prompt_turns

LOW_SCORE_RATIO = "low_score_ratio"
NO_SCORE_RATIO = "no_score_ratio"

CONVERTED_HH_MARKERS = ("HUMAN", "ASSISTANT")


def _history(history: str) -> list[dict[str, str]]:
    if history.lstrip().startswith(f"{CONVERTED_HH_MARKERS[0]}:"):
        return prompt_turns(history, *CONVERTED_HH_MARKERS)
    return [message("user", history)]


def _optional_number(value: Any, where: str) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    raise FormatError("wrong_type", f"'{where}' must be a number, got {type(value).__name__}")


def _score_ratio(row: dict[str, Any], score_a: float | None, score_b: float | None) -> float | None:
    ratio = _optional_number(row.get("score_ratio"), "score_ratio")
    if ratio is None and score_a is not None and score_b is not None and min(score_a, score_b) > 0:
        ratio = max(score_a, score_b) / min(score_a, score_b)
    return ratio


class SHPFormat(Format):
    name = "shp"
    columns = frozenset({"history", "human_ref_A", "human_ref_B", "labels"})

    def convert(self, row: dict[str, Any]) -> list[Candidate]:
        label = field(row, "labels")
        if label not in (0, 1) or isinstance(label, float) and not label.is_integer():
            raise FormatError(INVALID_LABEL, f"'labels' must be 1 (A preferred) or 0 (B preferred), got {label!r}")
        a, b = text(field(row, "human_ref_A"), "human_ref_A"), text(field(row, "human_ref_B"), "human_ref_B")
        score_a, score_b = _optional_number(row.get("score_A"), "score_A"), _optional_number(row.get("score_B"), "score_B")
        minimum = self.options.min_score_ratio
        if minimum is not None:
            ratio = _score_ratio(row, score_a, score_b)
            if ratio is None:
                raise FormatError(NO_SCORE_RATIO, "--min-score-ratio is set but the row has no score_ratio or scores")
            if not ratio >= minimum:  # NaN too
                raise FormatError(LOW_SCORE_RATIO, f"score ratio {ratio:g} is below --min-score-ratio {minimum:g}")
        if label == 1:
            (chosen, chosen_score), (rejected, rejected_score) = (a, score_a), (b, score_b)
        else:
            (chosen, chosen_score), (rejected, rejected_score) = (b, score_b), (a, score_a)
        meta = {k: row[k] for k in ("post_id", "domain") if isinstance(row.get(k), str)}
        return [{
            "prompt": _history(text(field(row, "history"), "history")),
            "chosen": answer(chosen), "rejected": answer(rejected),
            "chosen_score": chosen_score, "rejected_score": rejected_score, "meta": meta,
        }]
