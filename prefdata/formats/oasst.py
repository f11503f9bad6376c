"""OpenAssistant conversations, as trees or as flat message rows.

oasst_tree: the `*.trees.jsonl` export, one tree per row, `{"message_tree_id", "prompt":
{message_id, role: prompter|assistant, text, lang, rank, deleted, review_result, replies: [...]}}`.
oasst: the flat message table of oasst1/oasst2 (one message per row with `message_id`,
`parent_id`, `message_tree_id`): the rows of one tree (consecutive, as in the release) are put
back into a tree and read like the export. A message whose parent is not among its tree's rows
is left out with its replies and counted as `orphan`.

Every prompter message with two or more ranked assistant replies gives pairs (rank 0 = best; the
lower rank is chosen; `--pairs` / `--min-margin` as for any ranked source, on rank differences).
The prompt is the path from the root to that message. Deleted messages, messages whose review
failed and, with `--lang`, messages in another language are left out together with the replies
below them, and counted (by messages) under `deleted`, `review_failed`, `other_lang`; a prompter
message whose ranked replies tie is counted under `tie`. Ranks are kept in `meta`
(chosen_rank / rejected_rank), not as scores: a rank is not a score that margins can be taken of.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

from prefdata.formats.base import (
    UNSUPPORTED_ROLE,
    WRONG_TYPE,
    Candidate,
    Format,
    FormatError,
    Skipped,
    as_dict,
    as_list,
    field,
    message,
    text,
)
from prefdata.pairing import Scored, pair_up

DELETED = "deleted"
REVIEW_FAILED = "review_failed"
OTHER_LANG = "other_lang"
OASST_ROLES = {"prompter": "user", "assistant": "assistant"}


def _size(node: dict[str, Any]) -> int:
    """Messages in the subtree under (and including) `node`."""
    return 1 + sum(_size(r) for r in node.get("replies") or [] if isinstance(r, dict))


def _node_rank(node: dict[str, Any], where: str) -> float | None:
    rank = node.get("rank")
    if rank is None:
        return None
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise FormatError(WRONG_TYPE, f"'{where}.rank' must be a number, got {rank!r}")
    return float(rank)


class OasstTreeFormat(Format):
    name = "oasst_tree"
    columns = frozenset({"message_tree_id", "prompt"})

    def _left_out(self, node: dict[str, Any]) -> str | None:
        if node.get("deleted") is True:
            return DELETED
        if node.get("review_result") is False:
            return REVIEW_FAILED
        if self.options.lang is not None and node.get("lang") != self.options.lang:
            return OTHER_LANG
        return None

    def convert(self, row: dict[str, Any]) -> Iterator[Candidate | Skipped]:
        root = as_dict(field(row, "prompt"), "prompt")
        reason = self._left_out(root)
        if reason:
            raise FormatError(reason, f"the tree's first message is left out ({reason})")
        yield from self._visit(root, [], "prompt", str(row.get("message_tree_id")))

    def _visit(self, node: dict[str, Any], path: list[dict[str, str]], where: str,
               tree: str) -> Iterator[Candidate | Skipped]:
        role = text(field(node, "role", f"{where}."), f"{where}.role")
        if role not in OASST_ROLES:
            raise FormatError(UNSUPPORTED_ROLE, f"'{where}.role' is '{role}'; OASST roles are prompter, assistant")
        here = [*path, message(OASST_ROLES[role], text(field(node, "text", f"{where}."), f"{where}.text"))]
        replies = []
        for i, reply in enumerate(as_list(node.get("replies") or [], f"{where}.replies")):
            reply = as_dict(reply, f"{where}.replies[{i}]")
            reason = self._left_out(reply)
            if reason:
                yield Skipped(reason, _size(reply))
            else:
                replies.append((f"{where}.replies[{i}]", reply))
        if role == "prompter":
            yield from self._pairs(here, replies, tree)
        for reply_where, reply in replies:
            yield from self._visit(reply, here, reply_where, tree)

    def _pairs(self, prompt: list[dict[str, str]], replies: list[tuple[str, dict[str, Any]]],
               tree: str) -> Iterator[Candidate | Skipped]:
        ranked = [Scored(-rank, (where, reply)) for where, reply in replies
                  if reply.get("role") == "assistant" and (rank := _node_rank(reply, where)) is not None]
        if len(ranked) < 2:
            return
        try:
            pairing = pair_up(ranked, self.options.pairs, self.options.min_margin)
        except FormatError as exc:  # one prompt's replies tie: the tree's other prompts may still pair
            yield Skipped(exc.reason)
            return
        yield from pairing.skipped
        for chosen, rejected in pairing.pairs:
            (chosen_where, chosen_node), (rejected_where, rejected_node) = chosen.answer, rejected.answer
            yield {
                "prompt": prompt,
                "chosen": [message("assistant", text(field(chosen_node, "text", ""), f"{chosen_where}.text"))],
                "rejected": [message("assistant", text(field(rejected_node, "text", ""), f"{rejected_where}.text"))],
                "meta": {"message_tree_id": tree, "chosen_id": chosen_node.get("message_id"),
                         "rejected_id": rejected_node.get("message_id"),
                         "chosen_rank": -chosen.score, "rejected_rank": -rejected.score},
            }


ORPHAN = "orphan"
NO_ROOT = "no_root"
DUPLICATE_MESSAGE_ID = "duplicate_message_id"


class OasstFlatFormat(OasstTreeFormat):
    name = "oasst"
    columns = frozenset({"message_id", "parent_id", "message_tree_id", "role", "text"})
    group_by = "message_tree_id"

    def convert(self, row: dict[str, Any]) -> Iterator[Candidate | Skipped]:
        messages = [as_dict(m, f"rows[{i}]") for i, m in enumerate(row["rows"])]
        if repeated := sorted(str(i) for i, n in Counter(m.get("message_id") for m in messages).items() if n > 1):
            raise FormatError(DUPLICATE_MESSAGE_ID, f"message_id {repeated[0]!r} names more than one message of the tree: "
                              "which one a reply answers is unknown")
        nodes = {m.get("message_id"): {**m, "replies": []} for m in messages}
        roots = [nodes[m.get("message_id")] for m in messages if m.get("parent_id") is None]
        if len(roots) != 1:
            raise FormatError(NO_ROOT, f"a tree needs one message without parent_id, found {len(roots)}")
        for m in messages:
            parent = m.get("parent_id")
            if parent is not None and parent in nodes:
                nodes[parent]["replies"].append(nodes[m.get("message_id")])
        reachable = _size(roots[0])
        if reachable < len(messages):
            yield Skipped(ORPHAN, len(messages) - reachable)
        yield from super().convert({"message_tree_id": messages[0].get("message_tree_id"), "prompt": roots[0]})
