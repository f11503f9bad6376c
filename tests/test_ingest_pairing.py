"""The pairing rules of prefdata.pairing, by hand on small score lists."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prefdata.formats.base import FormatError, Skipped
from prefdata.pairing import Scored, pair_up

# b and c tie for best, d and e tie for worst
ANSWERS = [Scored(3.0, "a"), Scored(5.0, "b"), Scored(5.0, "c"), Scored(1.0, "d"), Scored(1.0, "e")]


def names(pairs):
    return [(chosen.answer, rejected.answer) for chosen, rejected in pairs]


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ("best-vs-worst", [("b", "d")]),
        ("best-vs-rest", [("b", "a"), ("b", "d"), ("b", "e")]),
        ("all", [("b", "a"), ("b", "d"), ("b", "e"), ("c", "a"), ("c", "d"), ("c", "e"), ("a", "d"), ("a", "e")]),
        ("adjacent", [("c", "a"), ("a", "d")]),
    ],
)
def test_rules(rule, expected):
    assert names(pair_up(ANSWERS, rule).pairs) == expected


def test_min_margin_keeps_pairs_at_least_that_far_apart_and_counts_the_rest():
    kept = pair_up(ANSWERS, "all", min_margin=2.5)
    assert names(kept.pairs) == [("b", "d"), ("b", "e"), ("c", "d"), ("c", "e")]
    assert kept.skipped == [Skipped("pair_low_margin", 4)]  # (b, a), (c, a), (a, d), (a, e): 2 apart
    kept = pair_up(ANSWERS, "adjacent", min_margin=2)
    assert names(kept.pairs) == [("c", "a"), ("a", "d")] and kept.skipped == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("at", [0, 1, 3])
def test_a_score_that_is_not_finite_orders_nothing(bad, at):
    """NaN compares false with everything, so a sort puts it anywhere: it made the wrong answer best."""
    answers = [Scored(3.0, "a"), Scored(5.0, "b"), Scored(1.0, "c"), Scored(4.0, "d")]
    answers[at] = Scored(bad, answers[at].answer)
    with pytest.raises(FormatError) as info:
        pair_up(answers, "best-vs-worst")
    assert info.value.reason == "non_finite_score"


@pytest.mark.parametrize(
    ("answers", "margin", "reason"),
    [
        ([Scored(1.0, "a")], 0, "too_few_answers"),
        ([], 0, "too_few_answers"),
        ([Scored(2.0, "a"), Scored(2.0, "b"), Scored(2.0, "c")], 0, "tie"),
        ([Scored(2.0, "a"), Scored(1.5, "b")], 1, "low_margin"),
    ],
)
def test_no_pair_is_a_reason(answers, margin, reason):
    with pytest.raises(FormatError) as info:
        pair_up(answers, "best-vs-worst", margin)
    assert info.value.reason == reason


@given(scores=st.lists(st.integers(0, 4), min_size=2, max_size=8),
       rule=st.sampled_from(["best-vs-worst", "best-vs-rest", "all", "adjacent"]))
def test_chosen_always_scores_higher(scores, rule):
    answers = [Scored(float(s), i) for i, s in enumerate(scores)]
    try:
        pairs = pair_up(answers, rule).pairs
    except FormatError as exc:
        assert exc.reason == "tie" and len(set(scores)) == 1
        return
    assert all(chosen.score > rejected.score for chosen, rejected in pairs)
    assert len(set(names(pairs))) == len(pairs)
    if rule == "all":  # every ordered pair of different scores, once
        assert len(pairs) == sum(1 for a in scores for b in scores if a > b)
