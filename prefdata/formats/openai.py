"""OpenAI preference fine-tuning JSONL (the DPO method of the fine-tuning API):

    {"input": {"messages": [{"role": "user", "content": …}, …], "tools": …},
     "preferred_output": [{"role": "assistant", "content": …}],
     "non_preferred_output": [{"role": "assistant", "content": …}]}

prompt = input.messages (`developer` is OpenAI's newer name for `system`); chosen / rejected = the
two output lists. Content may be a string or a list of text parts.
"""

from __future__ import annotations

from typing import Any

from prefdata.formats.base import STANDARD_ROLES, Candidate, Format, Messages, as_dict, field, messages, text_parts

OPENAI_ROLES = {**STANDARD_ROLES, "developer": "system"}


def _messages(value: Any, where: str) -> Messages:
    return messages(value, where, OPENAI_ROLES, content_of=text_parts)


class OpenAIPreferenceFormat(Format):
    name = "openai"
    columns = frozenset({"input", "preferred_output", "non_preferred_output"})

    def convert(self, row: dict[str, Any]) -> list[Candidate]:
        request = as_dict(field(row, "input"), "input")
        return [{
            "prompt": _messages(field(request, "messages", "input."), "input.messages"),
            "chosen": _messages(field(row, "preferred_output"), "preferred_output"),
            "rejected": _messages(field(row, "non_preferred_output"), "non_preferred_output"),
        }]
