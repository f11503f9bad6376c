"""HelpSteer2 preferences (nvidia/HelpSteer2 `preference/preference.jsonl`): `{"prompt",
"response_1", "response_2", "preference_strength"}`, strength -3..3: negative prefers response_1,
positive response_2, 0 is a tie (quarantined as `tie`); |strength| below `--min-margin` is
`low_margin`. The strength is kept in meta.

Multi-turn prompts carry NeMo turn markers ("…\\n<extra_id_1>Assistant\\n…\\n<extra_id_1>User\\n…");
they become messages.
"""

from __future__ import annotations

import re
from typing import Any

from prefdata.formats.base import WRONG_TYPE, Candidate, Format, FormatError, Messages, answer, field, message, text
from prefdata.pairing import LOW_MARGIN, TIE

TURN_MARKER = re.compile(r"\n?<extra_id_1>(User|Assistant)\n")
ROLES = {"User": "user", "Assistant": "assistant"}


def _prompt(value: str) -> Messages:
    parts = TURN_MARKER.split(value)
    turns = [message("user", parts[0])]
    turns += [message(ROLES[name], content) for name, content in zip(parts[1::2], parts[2::2])]
    return turns


class HelpSteer2PreferenceFormat(Format):
    name = "helpsteer2_preference"
    columns = frozenset({"prompt", "response_1", "response_2", "preference_strength"})

    def convert(self, row: dict[str, Any]) -> list[Candidate]:
        strength = field(row, "preference_strength")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)):
            raise FormatError(WRONG_TYPE, f"'preference_strength' must be a number, got {strength!r}")
        if strength == 0:
            raise FormatError(TIE, "preference_strength is 0")
        if abs(strength) < self.options.min_margin:
            raise FormatError(LOW_MARGIN, f"|preference_strength| {abs(strength):g} is below --min-margin")
        first, second = (text(field(row, key), key) for key in ("response_1", "response_2"))
        chosen, rejected = (first, second) if strength < 0 else (second, first)
        return [{"prompt": _prompt(text(field(row, "prompt"), "prompt")), "chosen": answer(chosen),
                 "rejected": answer(rejected), "meta": {"preference_strength": strength}}]
