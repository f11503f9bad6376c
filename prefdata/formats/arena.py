"""Chatbot Arena battles: two models answer the same user turns, a person votes.

arena human preference (the Kaggle 55k CSV): `prompt`, `response_a`, `response_b` are JSON-encoded
lists of turns (user turns; the models' answers to each), with `winner_model_a`, `winner_model_b`,
`winner_tie` as 0/1. conversations (lmsys/chatbot_arena_conversations): `conversation_a`,
`conversation_b` as message lists, `winner` ∈ model_a, model_b, tie, tie (bothbad).

Ties are quarantined as `tie`. A multi-turn battle keeps what both conversations share (the first
user turn, and more while the answers agree) as the prompt; the rest of each conversation is its
answer, so later user turns stay with the answers they led to. A JSON null inside a turn list (a
model that returned nothing) makes the row `null_value`.
"""

from __future__ import annotations

import json
from typing import Any

from prefdata.formats.base import (
    INVALID_LABEL,
    NULL_VALUE,
    WRONG_TYPE,
    Candidate,
    Format,
    FormatError,
    Messages,
    field,
    message,
    messages,
    split_common_prefix,
    text,
)
from prefdata.pairing import TIE

INVALID_TURNS = "invalid_json"


def _turn_list(value: Any, where: str) -> list[str]:
    """A JSON-encoded list of turns (or the list itself, from parquet)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise FormatError(INVALID_TURNS, f"'{where}' is not a JSON list of turns: {exc.msg}") from None
    if not isinstance(value, list):
        raise FormatError(WRONG_TYPE, f"'{where}' must be a list of turns, got {type(value).__name__}")
    for i, turn in enumerate(value):
        if turn is None:
            raise FormatError(NULL_VALUE, f"'{where}[{i}]' is null")
        text(turn, f"{where}[{i}]")
    return value


def _conversation(prompts: list[str], replies: list[str], where: str) -> Messages:
    if len(replies) != len(prompts):
        raise FormatError(WRONG_TYPE, f"'{where}' has {len(replies)} turns for {len(prompts)} prompts")
    return [m for user, reply in zip(prompts, replies) for m in (message("user", user), message("assistant", reply))]


def _flag(row: dict[str, Any], key: str) -> bool:
    value = field(row, key)
    if value in (1, "1", True):
        return True
    if value in (0, "0", False):
        return False
    raise FormatError(INVALID_LABEL, f"'{key}' must be 0 or 1, got {value!r}")


def _battle(conv_a: Messages, conv_b: Messages, a_wins: bool, row: dict[str, Any]) -> Candidate:
    winner, loser = (conv_a, conv_b) if a_wins else (conv_b, conv_a)
    models = (row.get("model_a"), row.get("model_b")) if a_wins else (row.get("model_b"), row.get("model_a"))
    prompt, chosen, rejected = split_common_prefix(winner, loser)
    meta = {"chosen_model": models[0], "rejected_model": models[1]}
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "meta": meta}


class ArenaHumanPreferenceFormat(Format):
    name = "arena"
    columns = frozenset({"prompt", "response_a", "response_b", "winner_model_a", "winner_model_b", "winner_tie"})

    def convert(self, row: dict[str, Any]) -> list[Candidate]:
        votes = [_flag(row, key) for key in ("winner_model_a", "winner_model_b", "winner_tie")]
        if sum(votes) != 1:
            raise FormatError(INVALID_LABEL, f"exactly one winner flag must be 1, got {votes}")
        if votes[2]:
            raise FormatError(TIE, "the vote is a tie")
        prompts = _turn_list(field(row, "prompt"), "prompt")
        conv_a = _conversation(prompts, _turn_list(field(row, "response_a"), "response_a"), "response_a")
        conv_b = _conversation(prompts, _turn_list(field(row, "response_b"), "response_b"), "response_b")
        return [_battle(conv_a, conv_b, votes[0], row)]


class ArenaConversationsFormat(Format):
    name = "arena_conversations"
    columns = frozenset({"conversation_a", "conversation_b", "winner"})

    def convert(self, row: dict[str, Any]) -> list[Candidate]:
        winner = text(field(row, "winner"), "winner")
        if winner.startswith("tie"):
            raise FormatError(TIE, f"the vote is '{winner}'")
        if winner not in ("model_a", "model_b"):
            raise FormatError(INVALID_LABEL, f"'winner' must be model_a, model_b, tie or tie (bothbad), got {winner!r}")
        conv_a = messages(field(row, "conversation_a"), "conversation_a")
        conv_b = messages(field(row, "conversation_b"), "conversation_b")
        return [_battle(conv_a, conv_b, winner == "model_a", row)]
