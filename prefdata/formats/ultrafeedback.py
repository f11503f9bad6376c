"""UltraFeedback, raw and binarized.

Raw (openbmb/UltraFeedback): `{"instruction", "completions": [{"model", "response", "annotations":
{aspect: {"Rating": "1".."5" | "N/A", …}}, "fine-grained_score", "overall_score"}, …]}`. Each
completion is scored by `--score`:

    mean-aspects   mean of the aspect ratings that are numbers ("N/A" left out)   (default)
    overall        `overall_score` (the raw release's overall score has a known 1→10 parsing bug,
                   hence not the default)
    aspect:NAME    the rating of one aspect (helpfulness, honesty, instruction_following, truthfulness)

An aspect is sometimes a one-element list instead of an object; it is read the same. A completion
without a score under the chosen rule is left out and counted as `unrated`. Pairs follow `--pairs`
and `--min-margin` (prefdata.pairing); the scores go into chosen_score / rejected_score. Under
`--unpaired` every rated completion is one record, labelled by `--score-threshold`.

Binarized (HuggingFaceH4/ultrafeedback_binarized): `{"prompt", "chosen": [msg…], "rejected":
[msg…], "score_chosen", "score_rejected"}`, the conversations including the prompt: the prompt is
their shared messages, the scores are kept, and equal scores are a `tie`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prefdata.formats.base import (
    UNRATED,
    WRONG_TYPE,
    Candidate,
    Format,
    FormatError,
    FormatOptions,
    Skipped,
    answer,
    as_dict,
    as_list,
    field,
    message,
    messages,
    split_common_prefix,
    text,
)
from prefdata.pairing import TIE, Scored, scored_candidates
from schemas.errors import UserError

SCORE_RULES = ("mean-aspects", "overall", "aspect:NAME")


def _rating(value: Any, where: str) -> float | None:
    """A rating: a number, a numeric string, or "N/A" (None)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        if value.strip().upper() == "N/A":
            return None
        try:
            return float(value)
        except ValueError:
            pass
    raise FormatError(WRONG_TYPE, f"'{where}' must be a rating (a number or N/A), got {value!r}")


def _number(value: Any, where: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise FormatError(WRONG_TYPE, f"'{where}' must be a number, got {value!r}")


def _aspect(annotations: dict[str, Any], name: str, where: str) -> float | None:
    value = annotations.get(name)
    if value is None:
        return None
    if isinstance(value, list):  # some rows hold an aspect as a one-element list
        if len(value) != 1:
            raise FormatError(WRONG_TYPE, f"'{where}.{name}' is a list of {len(value)}; expected one object")
        value = value[0]
    rating = as_dict(value, f"{where}.{name}").get("Rating")
    return None if rating is None else _rating(rating, f"{where}.{name}.Rating")


class UltraFeedbackFormat(Format):
    name = "ultrafeedback"
    columns = frozenset({"instruction", "completions"})
    rated = True

    def __init__(self, options: FormatOptions, columns: frozenset[str]) -> None:
        super().__init__(options, columns)
        self.rule = options.score or "mean-aspects"
        if self.rule not in ("mean-aspects", "overall") and not (self.rule.startswith("aspect:") and self.rule[7:]):
            raise UserError(f"--score {self.rule}: UltraFeedback takes {', '.join(SCORE_RULES)}")

    def _score(self, completion: dict[str, Any], where: str) -> float | None:
        if self.rule == "overall":
            score = completion.get("overall_score")
            return None if score is None else _rating(score, f"{where}.overall_score")
        annotations = as_dict(field(completion, "annotations", f"{where}."), f"{where}.annotations")
        if self.rule.startswith("aspect:"):
            return _aspect(annotations, self.rule[7:], f"{where}.annotations")
        ratings = [r for name in annotations if (r := _aspect(annotations, name, f"{where}.annotations")) is not None]
        return sum(ratings) / len(ratings) if ratings else None

    def convert(self, row: dict[str, Any]) -> Iterator[Candidate | Skipped]:
        prompt = [message("user", text(field(row, "instruction"), "instruction"))]
        scored = []
        for i, completion in enumerate(as_list(field(row, "completions"), "completions")):
            where = f"completions[{i}]"
            completion = as_dict(completion, where)
            score = self._score(completion, where)
            if score is None:
                yield Skipped(UNRATED)
                continue
            scored.append(Scored(score, completion))
        yield from scored_candidates(prompt, scored, _response, self.options)


def _response(completion: dict[str, Any]) -> tuple[list[dict[str, str]], dict[str, Any]]:
    return answer(text(field(completion, "response"), "response")), {"model": completion.get("model")}


class UltraFeedbackBinarizedFormat(Format):
    name = "ultrafeedback_binarized"
    columns = frozenset({"prompt", "chosen", "rejected", "score_chosen", "score_rejected"})
    rated = True

    def convert(self, row: dict[str, Any]) -> list[Candidate]:
        score_chosen, score_rejected = (_number(field(row, key), key) for key in ("score_chosen", "score_rejected"))
        if score_chosen == score_rejected:
            raise FormatError(TIE, f"score_chosen and score_rejected are both {score_chosen:g}")
        prompt, chosen, rejected = split_common_prefix(messages(field(row, "chosen"), "chosen"),
                                                       messages(field(row, "rejected"), "rejected"))
        return [{"prompt": prompt, "chosen": chosen, "rejected": rejected,
                 "chosen_score": score_chosen, "rejected_score": score_rejected}]
