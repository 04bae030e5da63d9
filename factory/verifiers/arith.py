"""Pure batch verifier for arithmetic completions: the toy's ``"3+4=7. 7-2=5. Answer: 5"`` and the free
text of instruct models (``"3 + 4 = 7. Then 7 - 2 = 5. The answer is 5."``).

The reward is binary (ReST-EM's outcome reward). Under ``strictness="answer"`` only the final answer
counts; under ``"steps"`` every equation written before the answer must also be true and the last one
must give the answer, which stops a model from being rewarded for lucky guesses wrapped in false working.
The rules, and what ``steps`` can and cannot check in free text, are in docs/arith_chat.md.

Everything here runs on untrusted model output, so the regexes are built to run in linear time
(no catastrophic backtracking) and numbers longer than 18 digits are never passed to ``int()``.
"""

from __future__ import annotations

import re
from fractions import Fraction

from factory.verifiers.phrases import SENTENCE_END, UNITS

STRICTNESS = ("answer", "steps")

# Longest digit string still treated as a number: fits in a signed 64-bit int, and bounds the
# cost of int() on adversarial output.
_MAX_DIGITS = 18
# Longest arithmetic run that is evaluated; a longer one is judged false, never trusted unchecked.
_MAX_RUN_CHARS = 300
# Equations read per completion (a real solution has a few dozen at most); past this the working counts
# as unchecked, which bounds the Python-side cost of megabyte-long degenerate outputs.
_MAX_EQUATIONS = 1000

# Written for Python 3.10 (no possessive quantifiers) yet linear on megabyte inputs: every number
# starts at the beginning of a digit run (lookbehind) and each token that follows a number cannot
# match a digit, so giving a digit back fails at once instead of exploring new splits.
# An integer, with or without thousands separators ("1,234"); "(?!\d|[.,]\d)" after it rejects
# decimals such as "5.5" rather than reading them as 5.
_INT = r"(?:\d{1,3}(?:,\d{3})+|\d+)"
_NOT_DECIMAL = r"(?!\d|[.,]\d)"
# The toy's format, read as before (anything may follow the number), plus markdown bold and "$".
_ANSWER_RE = re.compile(rf"Answer:(?:\*\*)?[ \t]*(?:\*\*)?\$?(-?{_INT}){_NOT_DECIMAL}")
# Free text: "The answer is 18." / "the final answer is: **18**" / "The answer is 18 pens." The number
# must end the sentence (units aside), so "the answer is 5 more than x" commits to nothing.
_PHRASE_RE = re.compile(
    rf"answer[ \t]+is(?:[ \t]*:)?(?:[ \t]*\*\*)?[ \t]*\$?(-?{_INT}){_NOT_DECIMAL}"
    rf"{UNITS}(?:\*\*)?{SENTENCE_END}",
    re.IGNORECASE,
)
_BOXED_RE = re.compile(rf"\\boxed\{{[ \t]*(-?{_INT})[ \t]*\}}")
# GSM8K's marker, which models trained on it write: "#### 18".
_HASH_RE = re.compile(rf"####[ \t]*\$?(-?{_INT}){_NOT_DECIMAL}{UNITS}{SENTENCE_END}")
_ANSWER_PATTERNS = (_ANSWER_RE, _PHRASE_RE, _BOXED_RE, _HASH_RE)

# A run of numbers joined by operators and "=": "3+4=7", "3 x 4 = 12", "3 + 4 - 2 = 5", "7 - 9 = -2".
# "x", "×" and "times" are multiplication only here, between two numbers. Numbers inside a run may be
# decimals, and a number may carry one unit word when an operator follows it ("4 books - 1 books = 3
# books" reads as 4 - 1 = 3), unless the word scales or compares it ("2 dozen", "5 more").
_NUM = r"\d+(?:\.\d+)?"
_OP = (
    r"(?:[-+*/=×x÷·−]|\\times|\\cdot|\\div"
    r"|(?<=[ \t])(?:times|plus|minus|divided[ \t]+by)(?=[ \t]))"  # words, between blanks
)
_NOT_EQUATION_UNITS = (
    "times|more|less|fewer|dozens?|hundreds?|thousands?|millions?|billions?|percent|half|halves|twice|"
    "thirds?|quarters?|of|per|each|and|or|than|then|is|are|was|were|so|x|plus|minus|divided"
)
_UNIT = rf"(?:[ \t]+(?=[A-Za-z])(?!(?:{_NOT_EQUATION_UNITS})\b)[A-Za-z]+(?=[ \t]*{_OP}))?"
_RUN_RE = re.compile(rf"(?<![\w.,]){_NUM}{_UNIT}(?:[ \t]*{_OP}[ \t]*-?{_NUM}{_UNIT})+", re.IGNORECASE)
# Tokens of a run; unit words are dropped, "x" alone and the operator words are operators.
_TOKEN_RE = re.compile(rf"{_NUM}|\\times|\\cdot|\\div|[A-Za-z]+|[-+*/=×÷·−]")
_TIMES = {"*", "x", "X", "×", "·", "\\times", "\\cdot"}
_DIVIDE = {"/", "÷", "\\div"}
_WORD_OPS = {"x": "*", "times": "*", "plus": "+", "minus": "-", "divided": "/"}
# Characters next to a run that make it part of a longer expression the checker cannot read, e.g. the
# "2 = 15" of "(3 + 4) * 2 = 15". "=" may precede a run ("Total = 3 + 4 = 7"): the run is then a claim
# of its own.
_LEFT_GLUE = set("+-*/×÷·−^({_\\")
_RIGHT_GLUE = set("+-*/=×÷·−^%}_\\")


def _canonical_int(text: str) -> str | None:
    """Return the canonical form of an integer string, or None if it is too long to trust.

    ``"007"`` -> ``"7"``, ``"-0"`` -> ``"0"``, ``"1,234"`` -> ``"1234"``; more than ``_MAX_DIGITS``
    significant digits -> None.
    """
    negative = text.startswith("-")
    digits = text.lstrip("-").replace(",", "").lstrip("0") or "0"
    if len(digits) > _MAX_DIGITS:
        return None
    if digits == "0":
        return "0"
    return f"-{digits}" if negative else digits


def _answers(completion: str) -> tuple[list[str], int]:
    """The distinct canonical answers (in order of appearance) and where the first answer statement starts.

    Answers are ``Answer: N`` (the toy's form), ``the answer is N`` ending a sentence, ``\\boxed{N}``
    and ``#### N``.
    The position is ``len(completion)`` when there is none.
    """
    found = []
    for pattern in _ANSWER_PATTERNS:
        found += [(m.start(), m.group(1)) for m in pattern.finditer(completion)]
    found.sort()
    values: list[str] = []
    for _, text in found:
        value = _canonical_int(text)
        if value is not None and value not in values:
            values.append(value)
    cut = completion.find("Answer:")
    first = min([pos for pos, _ in found] + ([cut] if cut >= 0 else []), default=len(completion))
    return values, first


def parse_answer(completion: str) -> str | None:
    """Extract the single committed answer from a completion.

    Args:
        completion: Model output text.

    Returns:
        The canonical integer string of ``Answer: N``, ``The answer is N.``, ``\\boxed{N}`` or
        ``#### N``, or None when there is no parseable answer or the completion commits to several
        distinct answers (hedging).
    """
    if not isinstance(completion, str):
        return None
    values, _ = _answers(completion)
    return values[0] if len(values) == 1 else None


def _is_glued(text: str, start: int, end: int) -> bool:
    """Whether the run ``text[start:end]`` continues into a longer expression on either side.

    A few blanks are skipped; markdown bold (``**``), a list bullet at the start of a line and LaTeX's
    ``\\(`` ``\\)`` are not glue, and a run wrapped in brackets as a whole (``(3 + 4 = 7)``) is a
    parenthetical, not a term.
    """
    i = start - 1
    while i >= 0 and start - i <= 8 and text[i] in " \t":
        i -= 1
    j = end
    while j < len(text) and j - end < 8 and text[j] in " \t":
        j += 1
    left = text[i] if i >= 0 else "\n"
    right = text[j] if j < len(text) else "\n"
    if left == "*" and i > 0 and text[i - 1] == "*":
        left = " "  # bold
    elif left in "-*+" and text[max(0, i - 8) : i].strip(" \t")[-1:] in ("\n", ""):
        left = " "  # a list bullet
    elif left.isalpha():
        # A LaTeX command ("\\frac", "\\sqrt") right before the run glues it; a word does not
        # ("Ann has 3 + 4 = 7").
        k = i
        while k >= 0 and i - k < 12 and text[k].isalpha():
            k -= 1
        if k >= 0 and text[k] == "\\":
            return True
    if right == "*" and text[j + 1 : j + 2] == "*":
        right = " "  # bold
    elif right == "\\" and text[j + 1 : j + 2] in (")", "]"):
        right = text[j + 1]  # "\\(3 + 4 = 7\\)": LaTeX inline math
    if left in "([" and right in ")]":
        return False
    return left in _LEFT_GLUE or right in _RIGHT_GLUE or right.isdigit()


def _evaluate(tokens: list[str]) -> int | Fraction | None:
    """The value of ``NUM (op NUM)*`` (unary minus allowed) with the usual precedence; None if malformed."""
    terms: list[int | Fraction] = []  # summands; the last one is being multiplied/divided
    pending = "+"
    i = 0
    expect_number = True
    while i < len(tokens):
        token = tokens[i]
        if not expect_number:
            pending = token
            expect_number = True
            i += 1
            continue
        sign = 1
        while token in ("-", "−"):
            sign, i = -sign, i + 1
            if i == len(tokens):
                return None
            token = tokens[i]
        if not token[0].isdigit():
            return None
        if len(token.split(".")[0].lstrip("0")) > _MAX_DIGITS or len(token) > 2 * _MAX_DIGITS:
            return None
        # Integers stay ints (fast); decimals and quotients become exact fractions.
        value = sign * (int(token) if "." not in token else Fraction(token))
        if pending in ("+", "-", "−"):
            terms.append(value if pending == "+" else -value)
        elif pending in _TIMES:
            terms[-1] *= value
        elif value == 0:
            return None  # division by zero: nothing to check
        else:
            terms[-1] = Fraction(terms[-1]) / value
        expect_number = False
        i += 1
    return sum(terms) if terms and not expect_number else None


def _equations(completion: str, cut: int) -> list[tuple[str, bool, int | Fraction | None]]:
    """Return ``(text, is_true, value)`` for each equation before ``cut`` (the first answer statement).

    An equation is a run of numbers and operators with at least one arithmetic operator and one "=".
    It is true when every side has the same value (a chain such as ``3 + 4 - 2 = 5`` is evaluated with
    the usual precedence); ``value`` is that value, or None when it is not true. A run glued to a longer
    expression the checker cannot read (the ``2 = 15`` of ``(3 + 4) * 2 = 15``), one too long, or one
    with a number too long to check counts as not true, and so does the rest after ``_MAX_EQUATIONS``
    equations: a reward must never rest on unchecked working.
    """
    body = completion[:cut]
    found = []
    for match in _RUN_RE.finditer(body):
        if "=" not in match.group(0):
            continue
        if len(found) == _MAX_EQUATIONS:
            found.append((f"more than {_MAX_EQUATIONS} equations (not checked)", False, None))
            break
        text = " ".join(match.group(0).split())
        if len(text) > _MAX_RUN_CHARS:
            found.append((f"{text[:40]}... (too long to check)", False, None))
            continue
        sides: list[list[str]] = [[]]
        for token in _TOKEN_RE.findall(text):
            if token[0].isalpha():
                token = _WORD_OPS.get(token.lower(), "")
                if not token:
                    continue  # a unit word, or the "by" of "divided by"
            if token == "=":
                sides.append([])
            else:
                sides[-1].append(token)
        glued = _is_glued(body, match.start(), match.end())
        if not glued and all(len(side) <= 2 for side in sides):
            continue  # "7 = 7", "2 = -3": no arithmetic to check
        if glued:
            found.append((f"{text} (part of an expression the checker cannot read)", False, None))
            continue
        values = [_evaluate(side) for side in sides]
        ok = all(v is not None for v in values) and len(set(values)) == 1
        found.append((text, ok, values[0] if ok else None))
    return found


def check_equations(completion: str) -> tuple[int, int]:
    """Count the equations written before the first answer statement and how many are true.

    Args:
        completion: Model output text.

    Returns:
        ``(num_equations, num_true)``; ``(0, 0)`` for non-str input.
    """
    if not isinstance(completion, str):
        return 0, 0
    _, cut = _answers(completion)
    equations = _equations(completion, cut)
    return len(equations), sum(1 for _, ok, _ in equations if ok)


def _verdict(reward: float, status: str, detail: str, answer: str | None, steps_valid: bool) -> dict:
    return {
        "reward": reward,
        "status": status,
        "detail": detail,
        "answer": answer,
        "steps_valid": steps_valid,
    }


def _judge(completion: object, gold: str | None, strictness: str) -> dict:
    """Judge one completion against a canonical gold answer (None: the problem has none)."""
    if not isinstance(completion, str):
        return _verdict(
            0.0, "unparseable", f"completion is {type(completion).__name__}, not str", None, False
        )
    values, cut = _answers(completion)
    if not values:
        return _verdict(0.0, "unparseable", "no 'Answer: <int>' or 'The answer is <int>.' found", None, False)
    if len(values) > 1:
        # A completion that commits to several answers must never be rewarded.
        shown = ", ".join(values[:5])
        return _verdict(0.0, "wrong", f"hedged between answers {shown}", None, False)
    answer = values[0]
    equations = _equations(completion, cut)
    first_false = next((text for text, ok, _ in equations if not ok), None)
    steps_valid = bool(equations) and first_false is None and equations[-1][2] == int(answer)
    if gold is None:
        return _verdict(0.0, "no_gold", f"answer {answer}; the problem has no gold", answer, steps_valid)
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
        answers: Gold answers as integer strings, one per completion; None or blank: the problem has no
            gold, and a completion with an answer gets status ``"no_gold"`` (reward 0) with that answer.
        strictness: ``"answer"`` rewards a correct final answer; ``"steps"`` also requires every
            equation to be true and the last one to equal the answer.

    Returns:
        One verdict per completion: ``{"reward", "status", "detail", "answer", "steps_valid"}``
        with status ``"correct"``, ``"wrong"``, ``"unparseable"`` or ``"no_gold"``. ``answer`` and
        ``steps_valid`` never depend on the gold.

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
        missing = gold is None or not str(gold).strip()
        verdicts.append(_judge(completion, None if missing else _canonical_gold(gold), strictness))
    return verdicts


def _canonical_gold(gold) -> str:
    gold_text = str(gold).strip()
    canonical = _canonical_int(gold_text) if re.fullmatch(r"-?\d+", gold_text) else None
    if canonical is None:
        raise ValueError(f"gold answer must be an integer string of <= {_MAX_DIGITS} digits, got {gold!r}")
    return canonical


def answer_classes(golds: list[str], answers: list[list[str | None]]) -> list[list[int | None]]:
    """Equivalence classes of each problem's sampled answers (for maj@k): integers are equal as integers.

    Args:
        golds: Gold answers as integer strings, one per problem.
        answers: Per problem, the extracted answer of each sample (a verdict's ``answer``; None: none).

    Returns:
        Per problem, one class per sample: 0 for the gold's value, 1, 2, ... for other values in order of
        first appearance, None where the answer is None.

    Raises:
        ValueError: If the lengths differ or a gold is not an integer string.
    """
    if len(golds) != len(answers):
        raise ValueError(f"got {len(golds)} golds but answers for {len(answers)} problems")
    result = []
    for gold, per in zip(golds, answers, strict=True):
        ids = {_canonical_gold(gold): 0}
        classes: list[int | None] = []
        for answer in per:
            if answer is None:
                classes.append(None)
                continue
            classes.append(ids.setdefault(_answer_key(answer), len(ids)))
        result.append(classes)
    return result


def group_answers(answers: list[list[str | None]]) -> list[list[int | None]]:
    """Equivalence classes of each problem's sampled answers with no gold (majority-vote labels).

    Integers are equal as integers (``"007"`` and ``"7"`` share a class); ids count up from 1 in order of
    first appearance; None stays None.
    """
    result = []
    for per in answers:
        ids: dict[str, int] = {}
        classes: list[int | None] = []
        for answer in per:
            if answer is None:
                classes.append(None)
                continue
            classes.append(ids.setdefault(_answer_key(answer), len(ids) + 1))
        result.append(classes)
    return result


def _answer_key(answer: str) -> str:
    """An answer's identity for voting: its canonical integer, else its text."""
    text = answer.strip()
    key = _canonical_int(text) if re.fullmatch(rf"-?{_INT}", text) else None
    return key if key is not None else f"text:{answer}"
