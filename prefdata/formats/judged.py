"""On-policy samples scored by a judge (`prefdata generate` → `prefdata judge`): one row per
prompt, `{"prompt": [msg…], "prompt_id", "responses": [{"text", "finish_reason", "score"}, …],
"policy", "judge"}`.

Responses are paired on their scores by `--pairs` and `--min-margin` (prefdata.pairing), like any
rated source (under `--unpaired`: one completion per response, labelled by `--score-threshold`);
the scores go into chosen_score / rejected_score, the policy and judge into meta. A
response that generation cut at `--max-new-tokens` (`finish_reason: "length"`) is left out and
counted as `truncated_response` unless ingest runs with `--keep-truncated`: an answer that stops
mid-sentence is usually judged worse for that alone, and DPO would learn "stop earlier". A
`generations.jsonl` that has not been judged yet has no scores: every row is `unscored`.
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
    messages,
    text,
)
from prefdata.pairing import Scored, scored_candidates

UNSCORED = "unscored"
TRUNCATED_RESPONSE = "truncated_response"


def _response_score(response: dict[str, Any], where: str) -> float:
    if "score" not in response:
        raise FormatError(UNSCORED, f"'{where}' has no score: run prefdata judge on this dump first")
    score = response["score"]
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        raise FormatError(WRONG_TYPE, f"'{where}.score' must be a number, got {score!r}")
    return float(score)


class JudgedFormat(Format):
    name = "judged"
    columns = frozenset({"prompt", "responses"})
    rated = True

    def convert(self, row: dict[str, Any]) -> Iterator[Candidate | Skipped]:
        prompt = messages(field(row, "prompt"), "prompt")
        scored = []
        for i, response in enumerate(as_list(field(row, "responses"), "responses")):
            where = f"responses[{i}]"
            response = as_dict(response, where)
            score = _response_score(response, where)
            if response.get("finish_reason") == "length" and not self.options.keep_truncated:
                yield Skipped(TRUNCATED_RESPONSE)
                continue
            scored.append(Scored(score, text(field(response, "text", f"{where}."), f"{where}.text")))
        meta = {"policy": row.get("policy"), "judge": row.get("judge")}
        yield from scored_candidates(prompt, scored, lambda response: (answer(response), {}), self.options, meta)
