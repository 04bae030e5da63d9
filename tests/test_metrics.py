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


def _metrics(gold, answers, correct, ks, greedy=False):
    """problem_metrics with the arith task's classes (integers compared as integers)."""
    from factory.verifiers.arith import answer_classes

    (classes,) = answer_classes([gold], [answers])
    return problem_metrics(greedy_correct=greedy, sample_correct=correct, sample_classes=classes, ks=ks)


def test_problem_metrics_hand_made():
    m = _metrics(
        "5", ["3", "5", "3", "5", "5", None], [False, True, False, True, True, False], [1, 2, 4, 8], True
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
    m = _metrics("7", ["7", "1", "1", "1"], [True, False, False, False], [1, 4])
    assert m["greedy_correct"] is False
    assert m["maj_at_k"] == {1: True, 4: False}
    assert m["pass_at_k"][1] == pytest.approx(0.25)
    assert m["pass_at_k"][4] == 1.0


def test_problem_metrics_length_mismatch():
    with pytest.raises(ValueError, match="sample_classes"):
        problem_metrics(greedy_correct=True, sample_correct=[], sample_classes=[0], ks=[1])


def _problems():
    return [
        _metrics("1", ["1", "1"], [True, True], [1, 2], True),
        _metrics("2", ["2", "3"], [True, False], [1, 2]),
        _metrics("3", [None, "4"], [False, False], [1, 2]),
        _metrics("4", ["5", "4"], [False, True], [1, 2], True),
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
    probs.append(_metrics("1", ["1"], [True], [1, 2], True))
    agg = aggregate(probs, [1, 2])
    assert agg["pass_at_k"][1] is not None
    assert agg["pass_at_k"][2] is None
    assert agg["maj_at_k"][2] is None


def test_aggregate_empty_raises():
    with pytest.raises(ValueError, match="no problems to aggregate"):
        aggregate([], [1])


def test_problem_metrics_without_classes_code_task():
    # Code tasks have no final answer (answer_classes is None): maj@k is undefined (None) while pass@k is
    # still estimated, including zero correct and k > n.
    out = problem_metrics(
        greedy_correct=False, sample_correct=[False, True, False], sample_classes=None, ks=[1, 2, 4]
    )
    assert out["maj_at_k"] == {1: None, 2: None, 4: None}
    assert out["pass_at_k"][1] == pytest.approx(1 / 3)
    assert out["pass_at_k"][2] == pytest.approx(2 / 3)
    assert out["pass_at_k"][4] is None
    none_right = problem_metrics(
        greedy_correct=False, sample_correct=[False, False], sample_classes=None, ks=[1, 2]
    )
    assert none_right["pass_at_k"] == {1: 0.0, 2: 0.0}


def test_maj_votes_by_class():
    # Class 0 is the gold's: it wins only with the most votes (ties: the class seen first).
    def maj(classes, k=None):
        k = k or len(classes)
        m = problem_metrics(
            greedy_correct=False, sample_correct=[c == 0 for c in classes], sample_classes=classes, ks=[k]
        )
        return m["maj_at_k"][k]

    assert maj([1, 0, 0, 2]) is True
    assert maj([1, 0, 0, 1]) is False  # tie, class 1 first
    assert maj([0, 1, 1, 1, 0]) is False
    assert maj([None, None, 0]) is True
    assert maj([None, None]) is False


def test_integer_answers_vote_as_integers():
    # arith: "007" and "7" are one answer; so are "1,000" and "1000" (a wrong one here).
    m = _metrics("7", ["1,000", "007", "1000", "7", "1000"], [False, True, False, True, False], [5])
    assert m["maj_at_k"] == {5: False}
    m = _metrics("1000", ["1,000", "5", "1000", "5"], [True, False, True, False], [4])
    assert m["maj_at_k"] == {4: True}


# --- maj@k with math answers: every answer votes by its math-verify class -----------------------


def _math_metrics(gold, answers, ks):
    pytest.importorskip("math_verify", reason="math-verify is not installed")
    from factory.verifiers.math import answer_classes, verify_one

    correct = [a is not None and verify_one(f"\\boxed{{{a}}}", gold)["reward"] > 0 for a in answers]
    (classes,) = answer_classes([gold], [answers], workers=1)
    return problem_metrics(greedy_correct=False, sample_correct=correct, sample_classes=classes, ks=ks)


def test_maj_counts_equivalent_forms_of_the_gold_answer_as_one():
    # Three correct samples wrote 1/2 three ways; string voting split them and let "3" win the tie.
    m = _math_metrics("\\frac{1}{2}", ["3", "0.5", "\\dfrac{1}{2}", "1/2", "3"], [1, 4, 5])
    assert m["maj_at_k"] == {1: False, 4: True, 5: True}
    # Two equal wrong answers beat one correct sample.
    assert _math_metrics("5", ["7", "5", "7"], [3])["maj_at_k"] == {3: False}


def test_equivalent_wrong_answers_outvote_the_correct_ones():
    # Two correct samples against three that all say 1/3 in different forms. Voting the wrong answers by
    # text (one vote each) made the two correct samples the majority: maj@k was overstated.
    m = _math_metrics("2", ["2", "\\frac{1}{3}", "1/3", "2", "\\dfrac13"], [2, 5])
    assert m["maj_at_k"] == {2: True, 5: False}
    # The same with 1/2 as the gold: 3, 6/2 and 3.0 are one wrong answer with three votes.
    m = _math_metrics("\\frac{1}{2}", ["3", "0.5", "1/2", "6/2", "3.0"], [5])
    assert m["maj_at_k"] == {5: False}


def test_math_answer_classes_gold_first_and_fallback():
    pytest.importorskip("math_verify", reason="math-verify is not installed")
    from factory.verifiers.math import answer_classes

    got = answer_classes(
        ["\\frac{1}{2}", "7"],
        [["0.5", None, "3", "1/3", "\\frac{2}{6}", "6/2", "1/2"], ["x^2", "8", "7.0", "x^{2}"]],
        workers=1,
    )
    assert got == [[0, None, 1, 2, 2, 1, 0], [1, 2, 0, 1]]


def test_evaluate_votes_equivalent_wrong_answers_together(tmp_path, tiny_model_dir, monkeypatch):
    """eval/evaluate.py asks the task for answer classes: three forms of 1/3 out-vote two correct 2s."""
    pytest.importorskip("math_verify", reason="math-verify is not installed")
    import factory.sample as sample_module
    from eval.evaluate import evaluate_model
    from factory.config import compose
    from factory.tasks import build_task

    cfg = compose(["task=gsm8k", "eval.num_samples=5", "eval.ks=[1,5]", "task.verifier_workers=1"])
    task = build_task(cfg.task)
    problems = [{"problem_id": "p0", "question": "What is 1 + 1?", "answer": "2"}]
    texts = ["\\boxed{2}", "\\boxed{\\frac{1}{3}}", "The answer is 1/3.", "#### 2", "\\boxed{\\dfrac13}"]

    def fake(model, tokenizer, prompts, *, num_samples, **kwargs):
        return [
            [
                {"completion": texts[j], "num_tokens": 1, "finish_reason": "stop", "seed": 0}
                for j in range(num_samples)
            ]
            for _ in prompts
        ]

    monkeypatch.setattr(sample_module, "generate", fake)
    try:
        metrics = evaluate_model(
            model_path=tiny_model_dir,
            task=task,
            problems=problems,
            settings=cfg.eval,
            out_dir=tmp_path / "eval",
        )
    finally:
        task.close()
    assert metrics["pass_at_k"][1] == pytest.approx(0.4)
    assert metrics["maj_at_k"][5] == 0.0  # was 1.0: the correct samples voted as one, the wrong ones by text
    import polars as pl

    row = pl.read_parquet(tmp_path / "eval" / "per_problem.parquet").row(0, named=True)
    assert row["sample_classes"] == [0, 1, 1, 0, 1]
