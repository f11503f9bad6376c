"""HelpSteer2 (nvidia/HelpSteer2), its ratings and its preferences.

helpsteer2: one row per response with 0-4 ratings of helpfulness, correctness, coherence,
complexity, verbosity; the rows of one prompt follow each other and are paired (`--pairs`,
`--min-margin`) by `--score helpfulness` (default) or `--score weighted`: the attribute weights
the Nemotron-4-340B-Reward model card recommends for a single reward, 0.3, 0.74, 0.46, 0.47, -0.33.
Scores go into chosen_score / rejected_score; under `--unpaired` every rated row is one
completion, labelled by `--score-threshold`.

helpsteer2_preference (`preference/preference.jsonl`): `{"prompt", "response_1", "response_2",
"preference_strength"}`, strength -3..3: negative prefers response_1, positive response_2, 0 is a
tie (quarantined as `tie`); |strength| below `--min-margin` is `low_margin`. The strength is kept
in meta.

Multi-turn prompts carry NeMo turn markers ("…\\n<extra_id_1>Assistant\\n…\\n<extra_id_1>User\\n…");
they become messages.
"""

from __future__ import annotations

import math
import re
from typing import Any

from prefdata.formats.base import (
    WRONG_TYPE,
    Candidate,
    Format,
    FormatError,
    FormatOptions,
    Messages,
    answer,
    as_dict,
    field,
    message,
    text,
)
from prefdata.pairing import LOW_MARGIN, NON_FINITE_SCORE, TIE, Scored, scored_candidates
from schemas.errors import UserError

TURN_MARKER = re.compile(r"\n?<extra_id_1>(User|Assistant)\n")
HELPSTEER_ROLES = {"User": "user", "Assistant": "assistant"}
WEIGHTS = {"helpfulness": 0.3, "correctness": 0.74, "coherence": 0.46, "complexity": 0.47, "verbosity": -0.33}


def _prompt(value: str) -> Messages:
    parts = TURN_MARKER.split(value)
    turns = [message("user", parts[0])]
    turns += [message(HELPSTEER_ROLES[name], content) for name, content in zip(parts[1::2], parts[2::2])]
    return turns


class HelpSteer2PreferenceFormat(Format):
    name = "helpsteer2_preference"
    columns = frozenset({"prompt", "response_1", "response_2", "preference_strength"})

    def convert(self, row: dict[str, Any]) -> list[Candidate]:
        strength = field(row, "preference_strength")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)):
            raise FormatError(WRONG_TYPE, f"'preference_strength' must be a number, got {strength!r}")
        if not math.isfinite(strength):
            raise FormatError(NON_FINITE_SCORE, f"preference_strength {strength} orders neither response")
        if strength == 0:
            raise FormatError(TIE, "preference_strength is 0")
        if abs(strength) < self.options.min_margin:
            raise FormatError(LOW_MARGIN, f"|preference_strength| {abs(strength):g} is below --min-margin")
        first, second = (text(field(row, key), key) for key in ("response_1", "response_2"))
        chosen, rejected = (first, second) if strength < 0 else (second, first)
        return [{"prompt": _prompt(text(field(row, "prompt"), "prompt")), "chosen": answer(chosen),
                 "rejected": answer(rejected), "meta": {"preference_strength": strength}}]


def _attribute_rating(row: dict[str, Any], name: str, where: str) -> float:
    value = field(row, name, f"{where}.")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FormatError(WRONG_TYPE, f"'{where}.{name}' must be a number, got {value!r}")
    return float(value)


class HelpSteer2Format(Format):
    name = "helpsteer2"
    columns = frozenset({"prompt", "response", *WEIGHTS})
    group_by = "prompt"
    rated = True

    def __init__(self, options: FormatOptions, columns: frozenset[str]) -> None:
        super().__init__(options, columns)
        self.rule = options.score or "helpfulness"
        if self.rule not in ("helpfulness", "weighted"):
            raise UserError(f"--score {self.rule}: HelpSteer2 takes helpfulness or weighted")

    def _score(self, row: dict[str, Any], where: str) -> float:
        if self.rule == "helpfulness":
            return _attribute_rating(row, "helpfulness", where)
        return sum(weight * _attribute_rating(row, name, where) for name, weight in WEIGHTS.items())

    def convert(self, row: dict[str, Any]) -> list[Candidate]:
        rows = [as_dict(r, f"rows[{i}]") for i, r in enumerate(row["rows"])]
        scored = [Scored(self._score(r, f"rows[{i}]"), r) for i, r in enumerate(rows)]
        prompt = _prompt(text(field(rows[0], "prompt"), "prompt"))
        return scored_candidates(prompt, scored, lambda r: (answer(text(field(r, "response"), "response")), {}), self.options)
