"""LLaMA-Factory preference data (`ranking: true` datasets).

sharegpt:  {"conversations": [{"from": "human"|"gpt"|"system", "value": …}, …], "system": str?,
            "chosen": {"from": "gpt", "value": …}, "rejected": {…}}
           (`role`/`content` keys with user/assistant roles are read too.) prompt = the optional
           `system` column + `conversations`; chosen / rejected = the one answer each.
v1:        {"chosen_messages": [{"role", "content": [{"type": "text", "value": …}], "loss_weight"}, …],
            "rejected_messages": […]}: two whole conversations; the prompt is their shared messages
           (implicit prompt, split at a message boundary).

Tool turns (`function_call`, `observation`, role `tool`) have no place in a record's
system/user/assistant messages, so such rows are quarantined as unsupported_role, not rewritten.
"""

from __future__ import annotations

from typing import Any

from prefdata.formats.base import (
    Candidate,
    Format,
    Messages,
    field,
    message,
    messages,
    split_common_prefix,
    text,
    text_parts,
)

SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", **{r: r for r in ("user", "assistant")}}


def _sharegpt_messages(value: Any, where: str) -> Messages:
    """sharegpt turns, with `from`/`value` keys or `role`/`content` keys (LLaMA-Factory's tags)."""
    items = value if isinstance(value, list) else [value]  # chosen/rejected: one dict or a list
    first = items[0] if items else None
    keys = ("from", "value") if isinstance(first, dict) and "from" in first else ("role", "content")
    return messages(items, where, SHAREGPT_ROLES, *keys)


class LlamaFactorySharegptFormat(Format):
    name = "llamafactory"
    columns = frozenset({"conversations", "chosen", "rejected"})

    def convert(self, row: dict[str, Any]) -> list[Candidate]:
        prompt = _sharegpt_messages(field(row, "conversations"), "conversations")
        system = row.get("system")
        if system is not None and text(system, "system").strip():
            prompt = [message("system", system), *prompt]
        return [{
            "prompt": prompt,
            "chosen": _sharegpt_messages(field(row, "chosen"), "chosen"),
            "rejected": _sharegpt_messages(field(row, "rejected"), "rejected"),
        }]


def _v1_messages(value: Any, where: str) -> Messages:
    return messages(value, where, content_of=lambda content, here: text_parts(content, here, "value"))


class LlamaFactoryV1Format(Format):
    name = "llamafactory_v1"
    columns = frozenset({"chosen_messages", "rejected_messages"})

    def convert(self, row: dict[str, Any]) -> list[Candidate]:
        prompt, chosen, rejected = split_common_prefix(
            _v1_messages(field(row, "chosen_messages"), "chosen_messages"),
            _v1_messages(field(row, "rejected_messages"), "rejected_messages"),
        )
        return [{"prompt": prompt, "chosen": chosen, "rejected": rejected}]
