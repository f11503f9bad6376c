"""Nectar (berkeley-nest/Nectar): `{"prompt": "\\n\\nHuman: …\\n\\nAssistant:", "answers": [{"answer",
"model", "rank"}, …]}` with rank 1 = best (ranks may be floats).

The prompt is an HH transcript ending with an empty "Assistant:" turn; its turns become the
prompt's messages. Answers are paired by rank (`--pairs`, `--min-margin` on rank differences);
ranks and models go to meta.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prefdata.formats.base import (
    WRONG_TYPE,
    Candidate,
    Format,
    FormatError,
    Skipped,
    answer,
    as_dict,
    as_list,
    field,
    text,
)
from prefdata.formats.hh import HH_NOT_ALTERNATING, LAST_ANSWER_MARKER, prompt_turns
from prefdata.pairing import Scored, pair_up


def _rank(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FormatError(WRONG_TYPE, f"'{where}' must be a number, got {value!r}")
    return float(value)


class NectarFormat(Format):
    name = "nectar"
    columns = frozenset({"prompt", "answers"})

    def convert(self, row: dict[str, Any]) -> Iterator[Candidate | Skipped]:
        transcript = text(field(row, "prompt"), "prompt").rstrip()
        if not transcript.endswith(LAST_ANSWER_MARKER):
            raise FormatError(HH_NOT_ALTERNATING, "'prompt' does not end with an empty 'Assistant:' turn")
        prompt = prompt_turns(transcript[: -len(LAST_ANSWER_MARKER)])
        ranked = []
        for i, item in enumerate(as_list(field(row, "answers"), "answers")):
            item = as_dict(item, f"answers[{i}]")
            ranked.append(Scored(-_rank(field(item, "rank", f"answers[{i}]."), f"answers[{i}].rank"), item))
        pairing = pair_up(ranked, self.options.pairs, self.options.min_margin)
        yield from pairing.skipped
        for chosen, rejected in pairing.pairs:
            yield {
                "prompt": prompt,
                "chosen": answer(text(field(chosen.answer, "answer"), "answer")),
                "rejected": answer(text(field(rejected.answer, "answer"), "answer")),
                "meta": {"chosen_model": chosen.answer.get("model"), "rejected_model": rejected.answer.get("model"),
                         "chosen_rank": -chosen.score, "rejected_rank": -rejected.score},
            }
