"""Anthropic HH-RLHF transcripts: `chosen` / `rejected` are whole conversations as text,
"\\n\\nHuman: …\\n\\nAssistant: …", identical up to the last assistant turn.

prompt = every turn before the last "Assistant:" (as user/assistant messages); chosen / rejected =
the last assistant turn of each. A row whose two transcripts differ before that point is
hh_prefix_mismatch; one whose turns do not alternate Human, Assistant, …, Assistant is
hh_not_alternating.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from prefdata.formats.base import Candidate, Format, FormatError, Messages, answer, field, message, text
from schemas.records import normalize_text

HH_PREFIX_MISMATCH = "hh_prefix_mismatch"
HH_NOT_ALTERNATING = "hh_not_alternating"

LAST_ANSWER_MARKER = "\n\nAssistant:"


def is_transcript(value: Any) -> bool:
    """Whether a string reads as an HH transcript (used by detection, here and in trl)."""
    return isinstance(value, str) and "Human:" in value and LAST_ANSWER_MARKER in value


def _last_turn(transcript: str, name: str) -> tuple[str, str]:
    cut = transcript.rfind(LAST_ANSWER_MARKER)
    if cut < 0:
        raise FormatError(HH_NOT_ALTERNATING, f"'{name}' has no '\\n\\nAssistant:' turn")
    reply = transcript[cut + len(LAST_ANSWER_MARKER):]
    if "\n\nHuman:" in reply:
        raise FormatError(HH_NOT_ALTERNATING, f"'{name}' ends with a Human turn, not an Assistant turn")
    return transcript[:cut], reply


@lru_cache
def _turn_marker(user: str, assistant: str) -> re.Pattern[str]:
    """A turn marker opens the transcript or follows a blank line; the split keeps the names."""
    return re.compile(rf"(?:^|\n\n)({re.escape(user)}|{re.escape(assistant)}):")


def prompt_turns(prefix: str, user: str = "Human", assistant: str = "Assistant") -> Messages:
    """The turns of a transcript up to the answer: user, assistant, …, user (HH's "Human:" /
    "Assistant:" by default; SHP's converted HH data writes "HUMAN:" / "ASSISTANT:")."""
    parts = _turn_marker(user, assistant).split(prefix)
    if parts[0].strip():
        raise FormatError(HH_NOT_ALTERNATING, f"text before the first '{user}:' turn")
    names, contents = parts[1::2], parts[2::2]
    if len(names) % 2 == 0 or names != [user, assistant] * (len(names) // 2) + [user]:
        order = " ".join(names) or "none"
        raise FormatError(HH_NOT_ALTERNATING, f"turns do not alternate {user}/{assistant} ending with {user}: {order}")
    roles = {user: "user", assistant: "assistant"}
    return [message(roles[n], c) for n, c in zip(names, contents)]


def _normalised_turns(turns: Messages) -> list[tuple[str, str]]:
    return [(m["role"], normalize_text(m["content"])) for m in turns]


class HHFormat(Format):
    name = "hh"
    columns = frozenset({"chosen", "rejected"})

    @classmethod
    def looks_like(cls, columns: frozenset[str], first: dict[str, Any]) -> bool:
        return cls.columns <= columns and "prompt" not in columns and is_transcript(first.get("chosen"))

    def convert(self, row: dict[str, Any]) -> list[Candidate]:
        chosen_prefix, chosen = _last_turn(text(field(row, "chosen"), "chosen"), "chosen")
        rejected_prefix, rejected = _last_turn(text(field(row, "rejected"), "rejected"), "rejected")
        prompt = prompt_turns(chosen_prefix)
        # Byte-equal prefixes are the norm; otherwise tolerate differences in surrounding whitespace only.
        if rejected_prefix != chosen_prefix and _normalised_turns(prompt_turns(rejected_prefix)) != _normalised_turns(prompt):
            raise FormatError(HH_PREFIX_MISMATCH, "chosen and rejected differ before the last Assistant turn")
        return [{"prompt": prompt, "chosen": answer(chosen), "rejected": answer(rejected)}]
