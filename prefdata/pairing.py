"""Pairs from several scored answers to one prompt, by one documented rule.

Every rule looks at the answers ordered best first (higher score first; equal scores keep their
input order) and never pairs two answers with equal scores:

    best-vs-worst  the first best answer against the first worst one          (default; 1 pair)
    best-vs-rest   the first best answer against every answer scored lower    (n - 1 pairs at most)
    all            every answer against every answer scored lower             (n(n-1)/2 at most)
    adjacent       each answer against the next one in the order, if lower    (n - 1 at most)

`--min-margin X` then keeps pairs whose scores differ by at least X. Sources that rank answers
(rank 1 = best) are paired on the negated rank. When no pair is left the row is quarantined: with
`too_few_answers`, `tie` (all scores equal) or `low_margin`.

Under `--unpaired`, rated sources (`scored_candidates`) are not paired: every rated answer becomes
one completion, desirable when its score reaches `--score-threshold`, with the score kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Generic, NamedTuple, TypeVar

from prefdata.formats.base import Candidate, FormatError, FormatOptions, Messages, PairingRule, Skipped

TOO_FEW_ANSWERS = "too_few_answers"
NON_FINITE_SCORE = "non_finite_score"  # NaN or ±inf: it orders no answer (and NaN sorts anywhere)
LOW_MARGIN_PAIRS = "pair_low_margin"  # pairs of a kept row under --min-margin (a part of the row left out)
TIE = "tie"
LOW_MARGIN = "low_margin"

T = TypeVar("T")


class Scored(NamedTuple, Generic[T]):
    score: float
    answer: T


class Pairing(NamedTuple, Generic[T]):
    pairs: list[tuple[Scored[T], Scored[T]]]  # (chosen, rejected)
    skipped: list[Skipped]  # the rule's pairs that --min-margin left out, for the manifest's stats


def _check_finite(answers: Sequence[Scored[T]]) -> None:
    if bad := [a.score for a in answers if not math.isfinite(a.score)]:
        raise FormatError(NON_FINITE_SCORE, f"score {bad[0]} orders no answer; {len(bad)} of {len(answers)} scores are not finite")


def pair_up(answers: Sequence[Scored[T]], rule: PairingRule, min_margin: float = 0.0) -> Pairing[T]:
    """(chosen, rejected) pairs by `rule`, and how many `min_margin` left out; FormatError when none is left."""
    if len(answers) < 2:
        raise FormatError(TOO_FEW_ANSWERS, f"{len(answers)} scored answer(s); a pair needs two")
    _check_finite(answers)
    ranked = sorted(answers, key=lambda a: -a.score)  # stable: equal scores keep their input order
    if ranked[0].score == ranked[-1].score:
        raise FormatError(TIE, f"all {len(ranked)} answers have the same score ({ranked[0].score:g})")
    if rule == "best-vs-worst":
        worst = next(a for a in ranked if a.score == ranked[-1].score)
        pairs = [(ranked[0], worst)]
    elif rule == "best-vs-rest":
        pairs = [(ranked[0], a) for a in ranked[1:] if a.score < ranked[0].score]
    elif rule == "all":
        pairs = [(a, b) for i, a in enumerate(ranked) for b in ranked[i + 1:] if a.score > b.score]
    else:  # adjacent
        pairs = [(a, b) for a, b in zip(ranked, ranked[1:]) if a.score > b.score]
    kept = [(a, b) for a, b in pairs if a.score - b.score >= min_margin]
    if not kept:
        best = max(a.score - b.score for a, b in pairs)
        raise FormatError(LOW_MARGIN, f"no pair differs by --min-margin {min_margin:g} (largest margin {best:g})")
    left_out = len(pairs) - len(kept)
    return Pairing(kept, [Skipped(LOW_MARGIN_PAIRS, left_out)] if left_out else [])


def scored_candidates(
    prompt: Messages, answers: Sequence[Scored[T]], completion: Callable[[T], tuple[Messages, dict[str, Any]]],
    options: FormatOptions, meta: dict[str, Any] | None = None,
) -> list[Candidate]:
    """A rated prompt's candidates. `completion(answer)` gives an answer's messages and its own meta
    (e.g. {"model": …}). Pairs by `--pairs` / `--min-margin`, the scores as chosen_score /
    rejected_score and each answer's meta prefixed `chosen_` / `rejected_`; under `--unpaired`
    one completion per answer, labelled by `--score-threshold` (FormatError when there is none)."""
    meta = meta or {}
    if options.unpaired:
        if not answers:
            raise FormatError(TOO_FEW_ANSWERS, "no scored answer")
        _check_finite(answers)
        labelled = []
        for a in answers:
            content, own = completion(a.answer)
            labelled.append({"prompt": prompt, "completion": content, "label": a.score >= options.score_threshold,
                             "score": a.score, "meta": {**meta, **own}})
        return labelled
    pairing = pair_up(answers, options.pairs, options.min_margin)
    pairs: list[Candidate] = [*pairing.skipped]
    for chosen, rejected in pairing.pairs:
        (chosen_messages, chosen_meta), (rejected_messages, rejected_meta) = completion(chosen.answer), completion(rejected.answer)
        pairs.append({"prompt": prompt, "chosen": chosen_messages, "rejected": rejected_messages,
                      "chosen_score": chosen.score, "rejected_score": rejected.score,
                      "meta": {**meta, **{f"chosen_{k}": v for k, v in chosen_meta.items()},
                               **{f"rejected_{k}": v for k, v in rejected_meta.items()}}})
    return pairs
