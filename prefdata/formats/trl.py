"""TRL's preference formats (the `datasets` layouts `trl.DPOTrainer` takes).

    explicit prompt, standard:        {"prompt": str, "chosen": str, "rejected": str}
    explicit prompt, conversational:  {"prompt": [msg…], "chosen": [msg…], "rejected": [msg…]}
    implicit prompt, standard:        {"chosen": str, "rejected": str}
    implicit prompt, conversational:  {"chosen": [msg…], "rejected": [msg…]}

A string prompt is one user message; a string answer is one assistant message. With an implicit
prompt the shared beginning of chosen and rejected is the prompt: for conversations the shared
messages up to the last shared user turn, for strings the shared text up to a word boundary.
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
    answer,
    field,
    message,
    messages,
    split_common_prefix,
    split_common_text,
)
from prefdata.formats.hh import is_transcript

# Columns that hold a prompt in other layouts: when one is present without `prompt`, chosen/rejected
# are answers to it, not whole conversations, so the implicit-prompt reading would be wrong.
PROMPT_LIKE_COLUMNS = frozenset(
    {"question", "instruction", "input", "query", "system", "history", "context", "conversations", "messages"}
)


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def _conversation_or_text(value: Any, where: str) -> Messages | str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return messages(value, where)
    raise FormatError(WRONG_TYPE, f"'{where}' must be a string or a list of messages, got {type(value).__name__}")


class TRLFormat(Format):
    name = "trl"
    columns = frozenset({"chosen", "rejected"})

    @classmethod
    def looks_like(cls, columns: frozenset[str], first: dict[str, Any]) -> bool:
        if not cls.columns <= columns:
            return False
        if "prompt" not in columns and columns & PROMPT_LIKE_COLUMNS:
            return False
        chosen = first.get("chosen")
        return _is_conversation(chosen) or (isinstance(chosen, str) and not is_transcript(chosen))

    def __init__(self, options: FormatOptions, columns: frozenset[str]) -> None:
        super().__init__(options, columns)
        self.explicit_prompt = "prompt" in columns

    def convert(self, row: dict[str, Any]) -> list[Candidate]:
        chosen = _conversation_or_text(field(row, "chosen"), "chosen")
        rejected = _conversation_or_text(field(row, "rejected"), "rejected")
        if type(chosen) is not type(rejected):
            raise FormatError(WRONG_TYPE, "'chosen' and 'rejected' must both be strings or both message lists")
        if self.explicit_prompt:
            prompt = _conversation_or_text(field(row, "prompt"), "prompt")
            if isinstance(prompt, str):
                prompt = [message("user", prompt)]
            if isinstance(chosen, str):
                chosen, rejected = answer(chosen), answer(rejected)
            return [{"prompt": prompt, "chosen": chosen, "rejected": rejected}]
        if isinstance(chosen, str):
            shared, chosen, rejected = split_common_text(chosen, rejected)
            prompt = [message("user", shared)] if shared.strip() else []  # → empty_prompt
            return [{"prompt": prompt, "chosen": answer(chosen), "rejected": answer(rejected)}]
        shared, chosen, rejected = split_common_prefix(chosen, rejected)
        return [{"prompt": shared, "chosen": chosen, "rejected": rejected}]
