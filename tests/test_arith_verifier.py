"""Tests for the arithmetic batch verifier (factory.verifiers.arith)."""

from __future__ import annotations

import random
import time

import pytest

from factory.verifiers.arith import STRICTNESS, answer_classes, check_equations, parse_answer, verify_batch


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
    # A chain claims every side equal: "3+4=7=8" says 7 = 8 (it used to count as the true "3+4=7").
    assert check_equations("3+4=7=8. Answer: 8") == (1, 0)
    assert check_equations("no maths here") == (0, 0)
    assert check_equations("2-5=-3. Answer: -3") == (1, 1)


def test_huge_numbers_are_not_parsed():
    big = "9" * 19
    assert parse_answer(f"Answer: {big}") is None
    assert _one(f"Answer: {big}", "5")["status"] == "unparseable"
    assert check_equations(f"{big}+1={big}0. Answer: 1") == (1, 0)


def test_megabyte_garbage_is_fast():
    # CPU time of this process, not wall time: other jobs on a shared machine must not fail the test.
    rng = random.Random(0)
    garbage = "".join(rng.choice("ab1 +-*=.:\nAnswer") for _ in range(1_000_000))
    start = time.process_time()
    v = _one(garbage, "5", "steps")
    assert time.process_time() - start < 1.0
    assert v["reward"] == 0.0 and v["status"] in ("wrong", "unparseable")


def test_megabyte_digit_string_is_fast():
    digits = "7" * 1_000_000
    start = time.process_time()
    verdicts = verify_batch(
        [digits, f"Answer: {digits}", f"{digits}+{digits}={digits}. Answer: 5"],
        ["5", "5", "5"],
        strictness="steps",
    )
    n_eq = check_equations(f"{digits}*{digits}={digits}")
    # Shapes that would make a naive backtracking regex quadratic.
    check_equations(f"{digits}.5 " + "1 " * 200_000 + "1+" * 200_000 + "=" * 10)
    parse_answer(f"Answer: {digits}.5")
    assert time.process_time() - start < 1.0
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


# --- free text (the chat prompt style: instruct models) ------------------------------------------


@pytest.mark.parametrize(
    "completion",
    [
        "3 + 4 = 7. 7 - 2 = 5. The answer is 5.",
        "The answer is **5**.",
        "**The answer is 5.**",
        "So Ann has 5 pens left.\n\nThe answer is 5 pens.",
        "The final answer is: 5",
        "the answer is 5",
        "**Answer:** 5",
        "The answer is $5.",
        "\\boxed{5}",
        "2 + 3 = 5 pens.\n#### 5",
        "The answer is 5.\nAnswer: 5",  # the same value twice is not hedging
    ],
)
def test_free_text_answers(completion):
    assert parse_answer(completion) == "5"
    assert _one(completion, "5")["status"] == "correct"


@pytest.mark.parametrize(
    "completion",
    [
        "The answer is 5 more than 3.",
        "the answer is 5 when she gives 2 away, so",
        "The answer is 5.5.",
        "The answer is 5 or 6.",
        "The answer is five.",
    ],
)
def test_free_text_prose_is_not_an_answer(completion):
    assert parse_answer(completion) is None
    assert _one(completion, "5")["status"] == "unparseable"


@pytest.mark.parametrize(
    "completion",
    [
        "The answer is 5. The answer is 6.",
        "Answer: 5\nThe answer is 6.",
        "The answer is 5 pens. \\boxed{6}",
        "**The answer is 6.** Wait, the answer is 5.",
        "#### 5\nThe answer is 9.",
    ],
)
@pytest.mark.parametrize("strictness", STRICTNESS)
def test_free_text_hedges_are_wrong(completion, strictness):
    v = _one(completion, "5", strictness)
    assert v["status"] == "wrong" and v["reward"] == 0.0 and "hedged" in v["detail"]


def test_free_text_canonical_integers():
    assert parse_answer("The answer is 1,234.") == "1234"
    assert parse_answer("The answer is 007 cards.") == "7"
    assert _one("The answer is 1,234.", "1234")["status"] == "correct"


@pytest.mark.parametrize(
    "completion",
    [
        "3 + 4 = 7. Then 7 - 2 = 5. The answer is 5.",
        "She has 3 x 4 = 12 cards, then 12 - 7 = 5. The answer is 5.",
        "3 × 4 = 12\n12 − 7 = 5\nThe answer is 5.",
        "4*3 = 12, 12 - 7 = 5. So the answer is **5**.",
        "3 + 4 - 2 = 5. The answer is 5.",  # a chain, left to right
        "2 + 3 * 1 = 5. The answer is 5.",  # usual precedence
        "- 3 + 4 = 7\n- 7 - 2 = 5\n\n**The answer is 5.**",  # list bullets are not minus signs
        "**3 + 4 = 7**, and **7 - 2 = 5**. The answer is 5.",
        "Ann has 5 pens (3 + 4 - 2 = 5). The answer is 5.",
        "\\(3 \\times 4 = 12\\), \\(12 - 7 = 5\\). The answer is 5.",
        "Total = 10 / 2 = 5. The answer is 5.",
        "4 books - 1 books = 3 books, then 3 books + 2 books = 5 books. The answer is 5.",  # units
        "10 divided by 2 = 5. The answer is 5.",
        "2 times 2 = 4, and 4 plus 1 = 5. The answer is 5.",
    ],
)
def test_free_text_true_steps(completion):
    v = _one(completion, "5", "steps")
    assert v["status"] == "correct" and v["steps_valid"], v


@pytest.mark.parametrize(
    ("completion", "detail"),
    [
        ("3 + 4 = 8. 8 - 3 = 5. The answer is 5.", "false equation 3 + 4 = 8"),
        ("3 x 4 = 13. 13 - 8 = 5. The answer is 5.", "false equation 3 x 4 = 13"),
        ("3 + 4 = 7 - 2 = 5. The answer is 5.", "false equation 3 + 4 = 7 - 2 = 5"),  # says 7 = 5
        ("(3 + 4) * 2 = 15. 10 - 5 = 5. The answer is 5.", "cannot read"),  # unread working is not trusted
        ("3 + 4 = 7. She has 5 left. The answer is 5.", "last equation result 7 != answer 5"),
        ("She has 5 pens. The answer is 5.", "no equations before the answer"),
        ("Half of 10 is 5, 10 / 0 = 5. The answer is 5.", "false equation 10 / 0 = 5"),
        ("1 books + 1 books + 3 books = 4 books. 4 + 1 = 5. The answer is 5.", "false equation 1 books"),
        ("2 dozen - 19 = 5. The answer is 5.", "cannot read"),  # a scale word is not a unit
    ],
)
def test_free_text_false_steps(completion, detail):
    assert _one(completion, "5", "answer")["status"] == "correct"
    v = _one(completion, "5", "steps")
    assert v["status"] == "wrong" and not v["steps_valid"] and detail in v["detail"], v


def test_free_text_equations_after_the_answer_are_not_read():
    assert check_equations("3 + 2 = 5. The answer is 5. Check: 5 + 1 = 7") == (1, 1)


def test_free_text_is_linear_on_adversarial_input():
    start = time.process_time()
    verify_batch(
        [
            "The answer is " * 70_000,
            "the answer is" + " " * 1_000_000 + "5",
            "The answer is 5" + " pens" * 200_000,
            "3 + " * 250_000 + "= 5. The answer is 5.",
            "(3 + 4 = 7) " * 80_000 + "The answer is 7.",
            "- 1 x 1 = 1\n" * 80_000 + "The answer is 1.",
        ],
        ["5", "5", "5", "5", "7", "1"],
        strictness="steps",
    )
    assert time.process_time() - start < 3.0


def test_answer_classes_compare_integers():
    got = answer_classes(["7", "12"], [["007", None, "8", "7", "8", "-0"], ["1,2", "12"]])
    assert got == [[0, None, 1, 0, 1, 2], [1, 0]]
    with pytest.raises(ValueError, match="golds"):
        answer_classes(["7"], [])
