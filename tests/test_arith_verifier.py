"""Tests for the arithmetic batch verifier (factory.verifiers.arith)."""

from __future__ import annotations

import random
import time

import pytest

from factory.verifiers.arith import STRICTNESS, check_equations, parse_answer, verify_batch


def _one(completion, gold, strictness="answer"):
    return verify_batch([completion], [gold], strictness=strictness)[0]


def test_strictness_values():
    assert STRICTNESS == ("answer", "steps")


@pytest.mark.parametrize("strictness", STRICTNESS)
def test_correct(strictness):
    v = _one("3+4=7. 7-2=5. Answer: 5", "5", strictness)
    assert v == {
        "reward": 1.0,
        "status": "correct",
        "detail": v["detail"],
        "answer": "5",
        "steps_valid": True,
    }
    assert isinstance(v["detail"], str) and v["detail"]


@pytest.mark.parametrize("strictness", STRICTNESS)
def test_wrong_answer(strictness):
    v = _one("3+4=7. 7-2=5. Answer: 5", "6", strictness)
    assert v["status"] == "wrong" and v["reward"] == 0.0 and v["answer"] == "5"
    assert "6" in v["detail"]


@pytest.mark.parametrize(
    "completion", ["", "3+4=7. 7-2=5.", "Answer:", "Answer: five", "answer 5", "Answer: 5.5"]
)
def test_unparseable(completion):
    v = _one(completion, "5")
    assert v["status"] == "unparseable" and v["reward"] == 0.0 and v["answer"] is None
    assert parse_answer(completion) is None


@pytest.mark.parametrize("completion", [None, b"Answer: 5", 5])
def test_non_str_completion_is_unparseable(completion):
    v = _one(completion, "5", "steps")
    assert v["status"] == "unparseable" and v["reward"] == 0.0


def test_false_equation_answer_vs_steps():
    answer = _one("10-1=8. Answer: 8", "8", "answer")
    assert answer["status"] == "correct" and answer["reward"] == 1.0
    assert answer["steps_valid"] is False
    steps = _one("10-1=8. Answer: 8", "8", "steps")
    assert steps["status"] == "wrong" and steps["reward"] == 0.0
    assert "false equation 10-1=8" in steps["detail"]


def test_steps_requires_equations_and_chain_to_answer():
    no_eq = _one("Answer: 8", "8", "steps")
    assert no_eq["status"] == "wrong" and not no_eq["steps_valid"]
    assert _one("Answer: 8", "8", "answer")["status"] == "correct"
    broken_chain = _one("3+4=7. Answer: 8", "8", "steps")
    assert broken_chain["status"] == "wrong" and not broken_chain["steps_valid"]


@pytest.mark.parametrize("strictness", STRICTNESS)
def test_hedged_answers_are_wrong(strictness):
    v = _one("3+0=3. Answer: 3 or maybe Answer: 4", "3", strictness)
    assert v["status"] == "wrong" and v["reward"] == 0.0
    assert "hedg" in v["detail"]
    assert parse_answer("Answer: 3 ... Answer: 4") is None


def test_repeated_same_answer_is_not_hedging():
    v = _one("1+2=3. Answer: 3. Answer: 03", "3", "steps")
    assert v["status"] == "correct"


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("Answer: 007", "7"),
        ("Answer: -0", "0"),
        ("Answer:12", "12"),
        ("Answer:   -5", "-5"),
        ("Answer: 000", "0"),
    ],
)
def test_canonicalisation(text, canonical):
    assert parse_answer(text) == canonical
    assert _one(text, canonical)["answer"] == canonical


def test_gold_is_canonicalised():
    assert _one("Answer: 7", "007")["status"] == "correct"


def test_equations_counted_before_first_answer():
    assert check_equations("3+4=7. 7*2=14. 14-1=12. Answer: 12") == (3, 2)
    assert check_equations("3 + 4 = 7. Answer: 7. 1+1=3") == (1, 1)
    assert check_equations("3+4=7=8. Answer: 8") == (1, 1)
    assert check_equations("no maths here") == (0, 0)
    assert check_equations("2-5=-3. Answer: -3") == (1, 1)


def test_huge_numbers_are_not_parsed():
    big = "9" * 19
    assert parse_answer(f"Answer: {big}") is None
    assert _one(f"Answer: {big}", "5")["status"] == "unparseable"
    assert check_equations(f"{big}+1={big}0. Answer: 1") == (1, 0)


def test_megabyte_garbage_is_fast():
    rng = random.Random(0)
    garbage = "".join(rng.choice("ab1 +-*=.:\nAnswer") for _ in range(1_000_000))
    start = time.perf_counter()
    v = _one(garbage, "5", "steps")
    assert time.perf_counter() - start < 1.0
    assert v["reward"] == 0.0 and v["status"] in ("wrong", "unparseable")


def test_megabyte_digit_string_is_fast():
    digits = "7" * 1_000_000
    start = time.perf_counter()
    verdicts = verify_batch(
        [digits, f"Answer: {digits}", f"{digits}+{digits}={digits}. Answer: 5"],
        ["5", "5", "5"],
        strictness="steps",
    )
    n_eq = check_equations(f"{digits}*{digits}={digits}")
    # Shapes that would make a naive backtracking regex quadratic.
    check_equations(f"{digits}.5 " + "1 " * 200_000 + "1+" * 200_000 + "=" * 10)
    parse_answer(f"Answer: {digits}.5")
    assert time.perf_counter() - start < 1.0
    assert [v["status"] for v in verdicts] == ["unparseable", "unparseable", "wrong"]
    assert n_eq == (1, 0)


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="completions"):
        verify_batch(["Answer: 1"], ["1", "2"])


def test_unknown_strictness_raises():
    with pytest.raises(ValueError, match="answer.*steps"):
        verify_batch(["Answer: 1"], ["1"], strictness="lenient")


def test_batch_order_preserved():
    verdicts = verify_batch(["Answer: 1", "Answer: 2", "nothing"], ["1", "1", "1"])
    assert [v["status"] for v in verdicts] == ["correct", "wrong", "unparseable"]
