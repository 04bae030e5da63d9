"""Tests for eval.metrics."""

import math
import random

import pytest

from eval.metrics import aggregate, majority_vote, pass_at_k, problem_metrics


def _comb_pass_at_k(n, c, k):
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (2, 1, 1, 0.5),
        (5, 2, 2, 0.7),
        (4, 0, 1, 0.0),
        (4, 0, 4, 0.0),
        (4, 3, 2, 1.0),
        (4, 4, 1, 1.0),
        (10, 1, 1, 0.1),
        (10, 3, 1, 0.3),
        (4, 1, 2, 0.5),
    ],
)
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_exact_edge_values():
    assert pass_at_k(4, 0, 2) == 0.0
    assert pass_at_k(4, 3, 2) == 1.0
    assert pass_at_k(0, 0, 1) is None
    assert pass_at_k(3, 1, 4) is None
    assert pass_at_k(3, 3, 4) is None


def test_pass_at_k_matches_comb_form():
    rng = random.Random(0)
    for _ in range(500):
        n = rng.randint(1, 60)
        c = rng.randint(0, n)
        k = rng.randint(1, n)
        assert pass_at_k(n, c, k) == pytest.approx(_comb_pass_at_k(n, c, k), abs=1e-9)


def test_pass_at_k_monotone_in_k():
    values = [pass_at_k(20, 3, k) for k in range(1, 21)]
    assert all(a <= b + 1e-12 for a, b in zip(values, values[1:], strict=False))


@pytest.mark.parametrize(("n", "c", "k"), [(-1, 0, 1), (3, -1, 1), (3, 4, 1), (3, 1, 0), (3, 1, -2)])
def test_pass_at_k_bad_args(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_majority_vote_basic_and_ties():
    assert majority_vote(["1", "2", "2"]) == "2"
    assert majority_vote(["a", "b", "b", "a"]) == "a"  # tie -> first seen
    assert majority_vote(["b", "a", "a", "b", "c"]) == "b"
    assert majority_vote([None, "x", None, "y", "y"]) == "y"
    assert majority_vote([None, None, "x"]) == "x"


def test_majority_vote_no_answers():
    assert majority_vote([]) is None
    assert majority_vote([None, None]) is None


def test_problem_metrics_hand_made():
    m = problem_metrics(
        gold="5",
        greedy_correct=True,
        sample_answers=["3", "5", "3", "5", "5", None],
        sample_correct=[False, True, False, True, True, False],
        ks=[1, 2, 4, 8],
    )
    assert m["greedy_correct"] is True
    assert m["num_samples"] == 6
    assert m["num_correct"] == 3
    assert set(m["pass_at_k"]) == {1, 2, 4, 8}
    assert m["pass_at_k"][1] == pytest.approx(0.5)
    assert m["pass_at_k"][2] == pytest.approx(1 - math.comb(3, 2) / math.comb(6, 2))
    assert m["pass_at_k"][4] == 1.0
    assert m["pass_at_k"][8] is None
    # first 1: "3" -> wrong; first 2: tie 3/5 -> "3" wrong; first 4: tie -> "3".
    assert m["maj_at_k"] == {1: False, 2: False, 4: False, 8: None}


def test_problem_metrics_maj_uses_prefix():
    m = problem_metrics(
        gold="7",
        greedy_correct=False,
        sample_answers=["7", "1", "1", "1"],
        sample_correct=[True, False, False, False],
        ks=[1, 4],
    )
    assert m["greedy_correct"] is False
    assert m["maj_at_k"] == {1: True, 4: False}
    assert m["pass_at_k"][1] == pytest.approx(0.25)
    assert m["pass_at_k"][4] == 1.0


def test_problem_metrics_length_mismatch():
    with pytest.raises(ValueError):
        problem_metrics(gold="1", greedy_correct=True, sample_answers=["1"], sample_correct=[], ks=[1])


def _problems():
    return [
        problem_metrics(
            gold="1", greedy_correct=True, sample_answers=["1", "1"], sample_correct=[True, True], ks=[1, 2]
        ),
        problem_metrics(
            gold="2", greedy_correct=False, sample_answers=["2", "3"], sample_correct=[True, False], ks=[1, 2]
        ),
        problem_metrics(
            gold="3",
            greedy_correct=False,
            sample_answers=[None, "4"],
            sample_correct=[False, False],
            ks=[1, 2],
        ),
        problem_metrics(
            gold="4", greedy_correct=True, sample_answers=["5", "4"], sample_correct=[False, True], ks=[1, 2]
        ),
    ]


def test_aggregate_hand_made():
    agg = aggregate(_problems(), [1, 2])
    assert agg["num_problems"] == 4
    assert agg["greedy_accuracy"] == pytest.approx(0.5)
    # pass@1 per problem: 1, 0.5, 0, 0.5 ; pass@2: 1, 1, 0, 1
    assert agg["pass_at_k"][1] == pytest.approx(0.5)
    assert agg["pass_at_k"][2] == pytest.approx(0.75)
    # maj@1: T, T, F(None vs "3"), F("5") ; maj@2: T, T("2" first), F("4"), F("5" first)
    assert agg["maj_at_k"][1] == pytest.approx(0.5)
    assert agg["maj_at_k"][2] == pytest.approx(0.5)


def test_aggregate_none_propagates():
    probs = _problems()
    probs.append(
        problem_metrics(gold="1", greedy_correct=True, sample_answers=["1"], sample_correct=[True], ks=[1, 2])
    )
    agg = aggregate(probs, [1, 2])
    assert agg["pass_at_k"][1] is not None
    assert agg["pass_at_k"][2] is None
    assert agg["maj_at_k"][2] is None


def test_aggregate_empty_raises():
    with pytest.raises(ValueError, match="no problems to aggregate"):
        aggregate([], [1])


def test_problem_metrics_without_gold_code_task():
    # Code tasks have no final answer: maj@k is undefined (None) while pass@k is still estimated,
    # including zero correct and k > n.
    out = problem_metrics(
        gold=None,
        greedy_correct=False,
        sample_answers=[None] * 3,
        sample_correct=[False, True, False],
        ks=[1, 2, 4],
    )
    assert out["maj_at_k"] == {1: None, 2: None, 4: None}
    assert out["pass_at_k"][1] == pytest.approx(1 / 3)
    assert out["pass_at_k"][2] == pytest.approx(2 / 3)
    assert out["pass_at_k"][4] is None
    none_right = problem_metrics(
        gold=None, greedy_correct=False, sample_answers=[None] * 2, sample_correct=[False, False], ks=[1, 2]
    )
    assert none_right["pass_at_k"] == {1: 0.0, 2: 0.0}


def test_maj_counts_equivalent_forms_of_the_gold_answer_as_one():
    # Three correct samples wrote 1/2 three ways; string voting split them and let "3" win the tie.
    m = problem_metrics(
        gold="\\frac{1}{2}",
        greedy_correct=False,
        sample_answers=["3", "0.5", "\\dfrac{1}{2}", "1/2", "3"],
        sample_correct=[False, True, True, True, False],
        ks=[1, 4, 5],
    )
    assert m["maj_at_k"] == {1: False, 4: True, 5: True}
    # Wrong answers still vote by their text: two "7"s beat one correct sample.
    m = problem_metrics(
        gold="5",
        greedy_correct=False,
        sample_answers=["7", "5", "7"],
        sample_correct=[False, True, False],
        ks=[3],
    )
    assert m["maj_at_k"] == {3: False}
