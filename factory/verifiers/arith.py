"""Pure batch verifier for arithmetic completions of the form ``"3+4=7. 7-2=5. Answer: 5"``.

The reward is binary (ReST-EM's outcome reward). Under ``strictness="answer"`` only the final
answer counts; under ``"steps"`` every equation written before the answer must also be true and
chain into it, which stops a model from being rewarded for lucky guesses wrapped in false working.

Everything here runs on untrusted model output, so the regexes are built to run in linear time
(no catastrophic backtracking) and numbers longer than 18 digits are never passed to ``int()``.
"""

from __future__ import annotations

import re

STRICTNESS = ("answer", "steps")

# Longest digit string still treated as a number: fits in a signed 64-bit int, and bounds the
# cost of int() on adversarial output.
_MAX_DIGITS = 18

# Written for Python 3.10 (no possessive quantifiers) yet linear on megabyte inputs: every number
# starts at the beginning of a digit run (lookbehind) and each token that follows a number cannot
# match a digit, so giving a digit back fails at once instead of exploring new splits.
# "(?!\d|\.\d)" rejects decimals such as "Answer: 5.5" rather than reading them as 5.
_ANSWER_RE = re.compile(r"Answer:[ \t]*(-?\d+)(?!\d|\.\d)")
_EQUATION_RE = re.compile(r"(?<![\d.])(-?\d+)[ \t]*([+\-*])[ \t]*(-?\d+)[ \t]*=[ \t]*(-?\d+)(?!\d|\.\d)")


def _canonical_int(text: str) -> str | None:
    """Return the canonical form of an integer string, or None if it is too long to trust.

    ``"007"`` -> ``"7"``, ``"-0"`` -> ``"0"``; more than ``_MAX_DIGITS`` significant digits -> None.
    """
    negative = text.startswith("-")
    digits = text.lstrip("-").lstrip("0") or "0"
    if len(digits) > _MAX_DIGITS:
        return None
    if digits == "0":
        return "0"
    return f"-{digits}" if negative else digits


def _distinct_answers(completion: str) -> list[str]:
    """Return the distinct canonical ``Answer: <int>`` values, in order of first appearance."""
    values: list[str] = []
    for match in _ANSWER_RE.finditer(completion):
        value = _canonical_int(match.group(1))
        if value is not None and value not in values:
            values.append(value)
    return values


def parse_answer(completion: str) -> str | None:
    """Extract the single committed answer from a completion.

    Args:
        completion: Model output text.

    Returns:
        The canonical integer string after ``Answer:``, or None when there is no parseable answer
        or the completion commits to several distinct answers (hedging).
    """
    if not isinstance(completion, str):
        return None
    values = _distinct_answers(completion)
    return values[0] if len(values) == 1 else None


def _equations(completion: str) -> list[tuple[str, bool, str | None]]:
    """Return ``(text, is_true, result)`` for each equation before the first ``Answer:``.

    ``result`` is the canonical right-hand side, or None when a number was too long to check.
    """
    cut = completion.find("Answer:")
    body = completion if cut < 0 else completion[:cut]
    found = []
    for match in _EQUATION_RE.finditer(body):
        left, op, right, result = match.groups()
        numbers = [_canonical_int(x) for x in (left, right, result)]
        text = f"{left}{op}{right}={result}"
        if any(n is None for n in numbers):
            # Unverifiable numbers count as false: a reward must never rest on unchecked working.
            found.append((text, False, None))
            continue
        a, b, c = (int(n) for n in numbers)
        value = a + b if op == "+" else a - b if op == "-" else a * b
        found.append((text, value == c, numbers[2]))
    return found


def check_equations(completion: str) -> tuple[int, int]:
    """Count the equations written before the first ``Answer:`` and how many are true.

    Args:
        completion: Model output text.

    Returns:
        ``(num_equations, num_true)``; ``(0, 0)`` for non-str input.
    """
    if not isinstance(completion, str):
        return 0, 0
    equations = _equations(completion)
    return len(equations), sum(1 for _, ok, _ in equations if ok)


def _verdict(reward: float, status: str, detail: str, answer: str | None, steps_valid: bool) -> dict:
    return {
        "reward": reward,
        "status": status,
        "detail": detail,
        "answer": answer,
        "steps_valid": steps_valid,
    }


def _judge(completion: object, gold: str, strictness: str) -> dict:
    """Judge one completion against a canonical gold answer."""
    if not isinstance(completion, str):
        return _verdict(
            0.0, "unparseable", f"completion is {type(completion).__name__}, not str", None, False
        )
    values = _distinct_answers(completion)
    if not values:
        return _verdict(0.0, "unparseable", "no 'Answer: <int>' found", None, False)
    if len(values) > 1:
        # A completion that commits to several answers must never be rewarded.
        shown = ", ".join(values[:5])
        return _verdict(0.0, "wrong", f"hedged between answers {shown}", None, False)
    answer = values[0]
    equations = _equations(completion)
    first_false = next((text for text, ok, _ in equations if not ok), None)
    steps_valid = bool(equations) and first_false is None and equations[-1][2] == answer
    if answer != gold:
        return _verdict(0.0, "wrong", f"answer {answer} != gold {gold}", answer, steps_valid)
    if strictness == "steps" and not steps_valid:
        if not equations:
            detail = "no equations before the answer"
        elif first_false is not None:
            detail = f"false equation {first_false}"
        else:
            detail = f"last equation result {equations[-1][2]} != answer {answer}"
        return _verdict(0.0, "wrong", detail, answer, steps_valid)
    return _verdict(1.0, "correct", f"answer {answer} matches gold", answer, steps_valid)


def verify_batch(completions: list[str], answers: list[str], *, strictness: str = "answer") -> list[dict]:
    """Judge a batch of completions against their gold answers.

    Args:
        completions: Model outputs; non-str entries are judged ``"unparseable"``.
        answers: Gold answers as integer strings, one per completion.
        strictness: ``"answer"`` rewards a correct final answer; ``"steps"`` also requires every
            equation to be true and the last one to equal the answer.

    Returns:
        One verdict per completion: ``{"reward", "status", "detail", "answer", "steps_valid"}``
        with status ``"correct"``, ``"wrong"`` or ``"unparseable"``.

    Raises:
        ValueError: On an unknown strictness, mismatched lengths, or a gold answer that is not an
            integer string.
    """
    if strictness not in STRICTNESS:
        raise ValueError(f"strictness must be one of {STRICTNESS}, got {strictness!r}")
    if len(completions) != len(answers):
        raise ValueError(f"got {len(completions)} completions but {len(answers)} answers")
    verdicts = []
    for completion, gold in zip(completions, answers, strict=True):
        gold_text = str(gold).strip()
        canonical_gold = _canonical_int(gold_text) if re.fullmatch(r"-?\d+", gold_text) else None
        if canonical_gold is None:
            raise ValueError(
                f"gold answer must be an integer string of <= {_MAX_DIGITS} digits, got {gold!r}"
            )
        verdicts.append(_judge(completion, canonical_gold, strictness))
    return verdicts
