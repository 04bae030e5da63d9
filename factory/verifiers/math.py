"""Verifier for free-form math answers (GSM8K, Hendrycks MATH, MATH-500), built on math-verify.

Conventions follow math-verify: the gold comes first (``verify(gold, pred)`` is not symmetric).
Every candidate answer is wrapped as ``\\boxed{...}`` before parsing, so math-verify's LaTeX
extraction sees exactly the text we extracted and never goes hunting through the whole completion.

The functions here are pure and single-item; :func:`verify_batch` runs them in the deadline pool
of :mod:`factory.verifiers.pool`, which is the only reliable way to bound sympy's run time.
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache

from factory.verifiers.phrases import SENTENCE_END, UNITS
from factory.verifiers.pool import DeadlinePool

# Extraction only looks at the end of a completion: final answers live there, and this bounds the
# regex and parsing cost of megabyte-long degenerate outputs.
TAIL_CHARS = 4000
# Longer "answers" are refused: no gold in GSM8K/MATH comes close, and sympy on them is slow.
MAX_ANSWER_CHARS = 500
# Address-space cap per pool worker, so a runaway bignum raises MemoryError instead of swapping.
WORKER_MEMORY_MB = 4096

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\b")
_HASH_RE = re.compile(r"####[ \t]*([^\n]*)")
_NUMBER = r"[-+]?\d[\d,]*(?:\.\d+)?(?:/\d+)?%?"
# "The answer is 72." / "final answer is: $\frac12$" / "**Answer:** 18" / "**The answer is 18.**" /
# "The answer is $18 dollars." The value must be inline math or a number-like token, optionally with a
# unit (factory/verifiers/phrases.py), and must end the sentence, so prose such as "the answer is at
# most 10 when ..." is not mistaken for a second (hedged) answer. No two unbounded blank runs touch
# (each "\s*" is followed by a fixed character), so a run of blanks costs linear, not quadratic, time.
_PHRASE_RE = re.compile(
    r"answer(?:\s+is(?:\s*:)?|\s*:)(?:\s*\*\*)?\s*"
    r"(?:(\$\$[^$]{1,600}\$\$|\$[^$\n]{1,600}\$|\\\((?:(?!\\\)).){1,600}\\\))"
    rf"|\\?\$?({_NUMBER})){UNITS}(?:\*\*)?{SENTENCE_END}",
    re.IGNORECASE,
)
# A "####" line that holds a number and a unit ("#### $18 dollars."): the number alone is the answer.
_HASH_UNIT_RE = re.compile(rf"(?:\*\*)?\\?\$?({_NUMBER}){UNITS}(?:\*\*)?[ \t]*[.!]?[ \t]*")
_PERIOD_RE = re.compile(r"(?<!\.)\.\s*$")
_MATH_DELIMS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def _braced(text: str, open_at: int) -> tuple[str, int] | None:
    """Return ``(content, end)`` of the brace group opening at ``text[open_at] == "{"``."""
    depth, i = 0, open_at
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # \{ and \} are literal braces, not grouping
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i], i + 1
        i += 1
    return None


def _boxes(text: str) -> list[tuple[int, str]]:
    """Return ``(position, content)`` of every outermost ``\\boxed``/``\\fbox`` in ``text``."""
    found, resume = [], 0
    for match in _BOX_RE.finditer(text):
        if match.start() < resume:
            continue  # nested inside the previous box
        rest = match.end()
        while rest < len(text) and text[rest] in " \t":
            rest += 1
        if rest < len(text) and text[rest] == "{":
            group = _braced(text, rest)
            if group is None:
                continue
            content, resume = group
        elif rest > match.end():
            # "\boxed 5" (no braces) appears in a few MATH solutions: the box holds one token.
            token = re.match(r"[^\s$.,]+", text[rest:])
            if token is None:
                continue
            content, resume = token.group(0), rest + token.end()
        else:
            continue
        found.append((match.start(), content.strip()))
    return found


def _strip_delims(text: str) -> str:
    text = text.strip()
    for left, right in _MATH_DELIMS:
        if len(text) > len(left) + len(right) and text.startswith(left) and text.endswith(right):
            return text[len(left) : -len(right)].strip()
    return text


def _drop_period(text: str) -> str:
    """Drop one sentence-ending period ("3." -> "3") but keep an ellipsis ("1, 2, ...")."""
    return _PERIOD_RE.sub("", text).strip()


def extract_gold(problem_or_solution: str, *, style: str) -> str | None:
    """Extract the gold answer from a reference solution.

    Args:
        problem_or_solution: A GSM8K ``answer`` field or a MATH ``solution``.
        style: ``"gsm8k"`` (text after the last ``####``, commas removed) or ``"boxed"`` (the
            content of the last ``\\boxed{...}``/``\\fbox{...}``, braces matched).

    Returns:
        The gold answer text, or None if there is none.

    Raises:
        ValueError: On an unknown style.
    """
    if style == "gsm8k":
        if "####" not in problem_or_solution:
            return None
        gold = problem_or_solution.rsplit("####", 1)[1].strip().replace(",", "")
        return gold or None
    if style == "boxed":
        boxes = _boxes(problem_or_solution)
        return boxes[-1][1] or None if boxes else None
    raise ValueError(f"style must be 'gsm8k' or 'boxed', got {style!r}")


def extract_answers(completion: str) -> list[str]:
    """Return every final-answer candidate in a completion, in order of appearance.

    Candidates are the contents of ``\\boxed{}``/``\\fbox{}``, the text after ``####`` and the value
    in "the answer is X" / "answer is: X" / "final answer: X" phrases. Only the last
    :data:`TAIL_CHARS` characters are searched.

    Args:
        completion: Model output.

    Returns:
        Candidate answer strings (math delimiters stripped); empty if there is none.
    """
    tail = completion[-TAIL_CHARS:]
    found = list(_boxes(tail))
    for match in _HASH_RE.finditer(tail):
        with_unit = _HASH_UNIT_RE.fullmatch(match.group(1).strip())
        found.append((match.start(), with_unit.group(1) if with_unit else match.group(1)))
    for match in _PHRASE_RE.finditer(tail):
        value = match.group(1) or match.group(2)
        if "\\boxed" not in value and "\\fbox" not in value:
            found.append((match.start(), value))
    candidates = []
    for _, text in sorted(found, key=lambda pair: pair[0]):
        text = _drop_period(_strip_delims(text))
        if text:
            candidates.append(text)
    return candidates


@lru_cache(maxsize=1)
def _math_verify():
    """Import math-verify lazily (sympy is slow to import) and silence its no-timeout warning.

    The warning is expected: math-verify's signal-based timeouts are switched off because the
    deadline pool enforces the limit from outside.
    """
    import math_verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return math_verify


def _parse(text: str, timeout: int | None) -> list:
    mv = _math_verify()
    # A sentence-ending period inside the box ("\\boxed{30^\\circ.}", 5 MATH golds) is not part of
    # the answer, and math-verify would otherwise compare it as text.
    return mv.parse(
        "\\boxed{" + _drop_period(_strip_delims(text)) + "}",
        extraction_config=[mv.LatexExtractionConfig()],
        parsing_timeout=timeout,
    )


def _same(a: list, b: list, timeout: int | None) -> bool:
    mv = _math_verify()
    return mv.verify(a, b, timeout_seconds=timeout) or mv.verify(b, a, timeout_seconds=timeout)


def _num_values(parsed: list) -> int:
    """How many values a parsed answer holds: >1 for sets, tuples and intervals written ``(a,b)``."""
    import sympy

    expr = parsed[0]
    if isinstance(expr, sympy.FiniteSet | sympy.Tuple):
        return len(expr)
    if isinstance(expr, sympy.Interval | sympy.Union):
        return 2
    return 1


def _verdict(reward: float, status: str, detail: str, answer: str | None = None) -> dict:
    return {"reward": reward, "status": status, "detail": detail, "answer": answer}


def verify_one(completion: str, gold: str | None, *, math_verify_timeout: int | None = None) -> dict:
    """Judge one completion against a gold answer.

    The extracted ``answer`` never depends on the gold (majority-vote labels read it with the gold
    hidden): a problem without a gold (None or blank) gets status ``"no_gold"`` with the answer, an
    unusable gold ``"gold_unparseable"`` with the answer; both reward 0.

    Args:
        completion: Model output.
        gold: Gold answer text (e.g. ``"72"`` or ``"\\frac{1}{2}"``); None or blank: no gold.
        math_verify_timeout: math-verify's own signal-based timeout in seconds. Leave None inside
            the pool (which enforces its own deadline); set it only in a main thread.

    Returns:
        ``{"reward", "status", "detail", "answer"}``; status is ``"correct"``, ``"wrong"``,
        ``"unparseable"``, ``"no_gold"`` or ``"gold_unparseable"``.
    """
    judged = _committed_answer(completion, math_verify_timeout)
    if isinstance(judged, dict):
        return judged  # unparseable or hedged: no gold could make it correct
    answer, parsed = judged
    if gold is None or (isinstance(gold, str) and not gold.strip()):
        return _verdict(0.0, "no_gold", f"answer {answer[:80]!r}; the problem has no gold", answer)
    if not isinstance(gold, str) or len(gold) > MAX_ANSWER_CHARS:
        return _verdict(0.0, "gold_unparseable", f"unusable gold {str(gold)[:80]!r}", answer)
    gold_parsed = _parse(gold, math_verify_timeout)
    if not gold_parsed:
        return _verdict(0.0, "gold_unparseable", f"math-verify cannot parse gold {gold[:80]!r}", answer)
    if _num_values(parsed) > 1 and _num_values(gold_parsed) == 1:
        return _verdict(0.0, "wrong", f"hedged: several values {answer[:80]!r} for one gold", answer)
    if _matches_gold(gold_parsed, parsed, math_verify_timeout):
        return _verdict(1.0, "correct", f"{answer[:80]!r} matches gold {gold[:80]!r}", answer)
    return _verdict(0.0, "wrong", f"{answer[:80]!r} != gold {gold[:80]!r}", answer)


def _committed_answer(completion, timeout: int | None) -> tuple[str, list] | dict:
    """The one answer a completion commits to, as ``(text, parsed)``, else its zero-reward verdict
    (unparseable, too long, hedged between distinct answers)."""
    if not isinstance(completion, str):
        return _verdict(0.0, "unparseable", f"completion is {type(completion).__name__}, not str")
    candidates = extract_answers(completion)
    if not candidates:
        return _verdict(0.0, "unparseable", "no \\boxed{}, '####' or 'the answer is' found")
    too_long = [c for c in candidates if len(c) > MAX_ANSWER_CHARS]
    if too_long:
        return _verdict(0.0, "wrong", f"answer too long ({len(too_long[0])} chars)")
    distinct: list[tuple[str, list]] = []
    for text in candidates:
        parsed = _parse(text, timeout)
        if not parsed or any(_same(seen, parsed, timeout) for _, seen in distinct):
            continue
        distinct.append((text, parsed))
        if len(distinct) > 1:
            # A completion that commits to several answers must never be rewarded.
            shown = " | ".join(t[:40] for t, _ in distinct)
            return _verdict(0.0, "wrong", f"hedged between distinct answers {shown}")
    if not distinct:
        return _verdict(0.0, "unparseable", f"math-verify cannot parse {candidates[-1][:80]!r}")
    return distinct[0]


def _matches_gold(gold_parsed: list, parsed: list, timeout: int | None) -> bool:
    """The verdict's test: gold first, and several values never match a single-valued gold."""
    if _num_values(parsed) > 1 and _num_values(gold_parsed) == 1:
        return False
    return _math_verify().verify(gold_parsed, parsed, timeout_seconds=timeout)


def classify_answers(gold: str, answers: list[str], *, math_verify_timeout: int | None = None) -> list[int]:
    """Group distinct answer texts of one problem into equivalence classes, the gold's class first.

    Class 0 holds exactly the answers :func:`verify_one` judges correct for ``gold``; every other answer
    joins the first earlier class whose representative (its first answer) math-verify finds equal in
    either direction, as hedging does, else opens a new class. An answer math-verify cannot parse is a
    class of its own.

    Args:
        gold: Gold answer text.
        answers: Distinct answer texts (the verdicts' ``answer`` values).
        math_verify_timeout: As in :func:`verify_one`.

    Returns:
        One class id per answer; ids other than 0 count up from 1 in order of first appearance.
    """
    usable = isinstance(gold, str) and gold.strip() and len(gold) <= MAX_ANSWER_CHARS
    gold_parsed = _parse(gold, math_verify_timeout) if usable else []
    representatives: list[list] = []  # representatives[i] is the first answer of class i + 1
    classes = []
    for text in answers:
        parsed = _parse(text, math_verify_timeout) if len(text) <= MAX_ANSWER_CHARS else []
        if parsed and gold_parsed and _matches_gold(gold_parsed, parsed, math_verify_timeout):
            classes.append(0)
            continue
        match = None
        if parsed:
            match = next(
                (
                    i
                    for i, rep in enumerate(representatives)
                    if rep and _same(rep, parsed, math_verify_timeout)
                ),
                None,
            )
        if match is None:
            representatives.append(parsed)
            match = len(representatives) - 1
        classes.append(match + 1)
    return classes


def _verify_item(item: tuple) -> dict | list[int]:
    kind, *args = item
    return verify_one(*args) if kind == "verify" else classify_answers(*args)


def _on_timeout(item: tuple, reason: str) -> dict | None:
    # None for a grouping job: answer_classes then falls back to exact text for that problem.
    return _verdict(0.0, "timeout", f"verification {reason}") if item[0] == "verify" else None


def _on_error(item: tuple, trace: str) -> dict | None:
    if item[0] != "verify":
        return None
    # math-verify swallows most errors itself; what reaches here (e.g. MemoryError) is the
    # completion's fault, so it is judged like an unparseable answer rather than crashing a batch.
    last = trace.strip().splitlines()[-1] if trace.strip() else "unknown error"
    return _verdict(0.0, "unparseable", f"verifier error: {last[:200]}")


def make_pool(*, timeout: float = 5.0, workers: int = 2) -> DeadlinePool:
    """Create a reusable pool for :func:`verify_batch` and :func:`answer_classes` (a context manager)."""
    return DeadlinePool(
        _verify_item,
        workers=workers,
        timeout=timeout,
        chunk_size=64,
        on_timeout=_on_timeout,
        on_error=_on_error,
        preload=("factory.verifiers.math", "math_verify", "sympy"),
        memory_limit_mb=WORKER_MEMORY_MB,
    )


def verify_batch(
    completions: list[str],
    golds: list[str],
    *,
    timeout: float = 5.0,
    workers: int = 2,
    pool: DeadlinePool | None = None,
) -> list[dict]:
    """Judge completions against golds in worker processes with a per-sample deadline.

    Args:
        completions: Model outputs.
        golds: Gold answer texts, one per completion.
        timeout: Wall-clock seconds per sample; overruns get status ``"timeout"``.
        workers: Worker processes (ignored when ``pool`` is given).
        pool: A pool from :func:`make_pool` to reuse across calls (saves worker start-up).

    Returns:
        One verdict per completion, in input order (see :func:`verify_one`, plus ``"timeout"``).

    Raises:
        ValueError: If the lengths differ.
    """
    if len(completions) != len(golds):
        raise ValueError(f"got {len(completions)} completions but {len(golds)} golds")
    # Only the tail is ever read, so cut before pickling: a 1 MB completion costs nothing to send.
    items = [
        ("verify", c[-TAIL_CHARS:] if isinstance(c, str) else c, g)
        for c, g in zip(completions, golds, strict=True)
    ]
    if pool is not None:
        return pool.map(items, timeout=timeout)
    with make_pool(timeout=timeout, workers=workers) as own_pool:
        return own_pool.map(items)


def answer_classes(
    golds: list[str],
    answers: list[list[str | None]],
    *,
    timeout: float = 5.0,
    workers: int = 2,
    pool: DeadlinePool | None = None,
) -> list[list[int | None]]:
    """Equivalence classes of each problem's sampled answers (for maj@k), in worker processes.

    Args:
        golds: Gold answer texts, one per problem.
        answers: Per problem, the extracted answer of each sample (a verdict's ``answer``; None: none).
        timeout: Seconds per distinct answer of a problem; a problem whose grouping overruns (or fails)
            falls back to exact text: the gold's own text is class 0, every other text its own class.
        workers: Worker processes (ignored when ``pool`` is given).
        pool: A pool from :func:`make_pool` to reuse.

    Returns:
        Per problem, one class id per sample (see :func:`classify_answers`; None where the answer is None).

    Raises:
        ValueError: If the lengths differ.
    """
    if len(golds) != len(answers):
        raise ValueError(f"got {len(golds)} golds but answers for {len(answers)} problems")
    distinct = [list(dict.fromkeys(a for a in per if a is not None)) for per in answers]
    items = [("classes", gold, texts) for gold, texts in zip(golds, distinct, strict=True)]
    # One job groups a whole problem: allow the per-answer deadline for each of its distinct answers.
    limit = timeout * max([1, *(len(texts) + 1 for texts in distinct)])
    if pool is not None:
        grouped = pool.map(items, timeout=limit)
    else:
        with make_pool(timeout=limit, workers=workers) as own_pool:
            grouped = own_pool.map(items)
    result = []
    for gold, texts, classes, per in zip(golds, distinct, grouped, answers, strict=True):
        if classes is None:
            same_as_gold = [gold is not None and t.strip() == str(gold).strip() for t in texts]
            classes = [
                0 if same else i + 1 for i, (t, same) in enumerate(zip(texts, same_as_gold, strict=True))
            ]
        of_text = dict(zip(texts, classes, strict=True))
        result.append([None if a is None else of_text[a] for a in per])
    return result


def group_answers(
    answers: list[list[str | None]],
    *,
    timeout: float = 5.0,
    workers: int = 2,
    pool: DeadlinePool | None = None,
) -> list[list[int | None]]:
    """Equivalence classes of each problem's sampled answers with no gold at all (majority-vote labels).

    :func:`answer_classes` with every gold hidden: answers math-verify finds equal (either direction) share
    a class, ids count up from 1 in order of first appearance, None stays None; a problem whose grouping
    overruns its deadline falls back to exact text.
    """
    return answer_classes([None] * len(answers), answers, timeout=timeout, workers=workers, pool=pool)
