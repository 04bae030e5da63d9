"""Batch verifier for reasoning-gym tasks: the dataset's own ``score_answer(answer, entry)``.

The final answer is the text after the last ``Answer:`` in the completion (the form the prompts ask for and
the human solutions use), to its end (so multi-line answers such as grids fit), with whitespace and
markdown bold (``**``) around it stripped. A completion without ``Answer:`` falls back to the last "the
answer is X" phrase (any case, ``:`` optional, not "is not ..."), X to the end of its sentence or line,
without quotes: instruct models such as SmolLM2-135M-Instruct mostly end that way (README "reasoning-gym
tasks"). Only the format is lenient: ``score_answer`` still decides. The reward is 1 when ``score_answer`` gives at least the task's
threshold, else 0 (ReST-EM's binary reward; reasoning-gym's partial credit is recorded in the detail).

``score_answer`` is third-party code run on untrusted model output (some datasets parse it with sympy or
evaluate it), so it runs in a :class:`~factory.verifiers.pool.DeadlinePool`: a hang becomes status
``timeout``, an exception status ``error``, and neither stops the stage.
"""

from __future__ import annotations

import json
import re
from functools import cache

from factory.verifiers.pool import DeadlinePool

ANSWER_MARKER = "Answer:"
# Longer answers are not scored (status "too_long"): a runaway generation must not reach score_answer,
# whose parsers may be far from linear. Long golds (big grids) raise the cap to four times their length.
MAX_ANSWER_CHARS = 4000
# "the answer is X": a whole word "is" (not "isn't"), X not a hedge ("not 5", "at most 10").
_ANSWER_IS = re.compile(r"\banswer is\b:?(?![ \t]*(?:not|at most|at least|unclear|unknown)\b)", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?:\s|$)|\n")
# Address-space cap per worker, so a runaway computation raises MemoryError instead of swapping.
WORKER_MEMORY_MB = 4096


def extract_answer(completion: object) -> str | None:
    """The final answer: the text after the last ``Answer:``, stripped of blanks and ``**`` (else after
    the last "answer is", to the end of its line).

    Args:
        completion: Model output (anything that is not a str has no answer).

    Returns:
        The answer text, or None when there is neither ``Answer:`` nor "answer is", or nothing follows.
    """
    if not isinstance(completion, str):
        return None
    at = completion.rfind(ANSWER_MARKER)
    if at < 0:
        phrases = list(_ANSWER_IS.finditer(completion))
        if not phrases:
            return None
        rest = completion[phrases[-1].end() :]
        # X ends with its sentence ('18. Let me check' -> 18) or line; quotes and bold are not the answer.
        end = _SENTENCE_END.search(rest)
        text = (rest[: end.start()] if end else rest).strip().strip("*\"'`").strip()
        return text or None
    text = completion[at + len(ANSWER_MARKER) :].strip()
    # "**Answer:** 42" and "Answer: **42**": markdown bold is layout, not part of the answer.
    text = text.removeprefix("**").removesuffix("**").strip()
    return text or None


def _verdict(reward: float, status: str, detail: str, answer: str | None) -> dict:
    return {"reward": reward, "status": status, "detail": detail, "answer": answer, "steps_valid": None}


@cache
def _dataset(name: str, config_json: str):
    """The dataset object whose ``score_answer`` judges (built once per worker and config)."""
    import reasoning_gym

    return reasoning_gym.create_dataset(name, seed=0, size=1, **json.loads(config_json))


def _score(item: tuple) -> float:
    """``score_answer`` of one answer (runs in a pool worker)."""
    name, config_json, answer, entry = item
    score = _dataset(name, config_json).score_answer(answer, entry)
    return float(score)


def _on_timeout(item: tuple, reason: str) -> dict:
    return {"failed": "timeout", "detail": f"score_answer {reason}"}


def _on_error(item: tuple, trace: str) -> dict:
    last = trace.strip().splitlines()[-1] if trace.strip() else "unknown error"
    return {"failed": "error", "detail": f"score_answer raised {last[:200]}"}


def make_pool(*, timeout: float = 5.0, workers: int = 2) -> DeadlinePool:
    """A reusable worker pool for :func:`verify_batch` and :func:`answer_classes` (a context manager)."""
    return DeadlinePool(
        _score,
        workers=workers,
        timeout=timeout,
        chunk_size=64,
        on_timeout=_on_timeout,
        on_error=_on_error,
        preload=("factory.verifiers.reasoning_gym", "reasoning_gym"),
        memory_limit_mb=WORKER_MEMORY_MB,
    )


def _answer_cap(entry: dict) -> int:
    return max(MAX_ANSWER_CHARS, 4 * len(str(entry.get("answer") or "")))


def _scores(answers: list[str], entries: list[dict], *, dataset: str, config: dict, pool, timeout: float):
    """Scores (float) or failure dicts, one per (answer, entry) pair, from the pool."""
    config_json = json.dumps(config, sort_keys=True)
    items = [(dataset, config_json, a, e) for a, e in zip(answers, entries, strict=True)]
    if not items:
        return []
    if pool is not None:
        return pool.map(items, timeout=timeout)
    with make_pool(timeout=timeout) as own_pool:
        return own_pool.map(items)


def verify_batch(
    completions: list,
    entries: list[dict],
    *,
    dataset: str,
    config: dict | None = None,
    threshold: float = 1.0,
    timeout: float = 5.0,
    pool: DeadlinePool | None = None,
) -> list[dict]:
    """Judge completions with the dataset's ``score_answer``.

    Args:
        completions: Model outputs; non-str entries are judged ``unparseable``.
        entries: The reasoning-gym entries (``question``, ``answer``, ``metadata``), one per completion.
        dataset: The reasoning-gym dataset name whose ``score_answer`` judges.
        config: The dataset's config (``task.dataset_config``), as given to ``create_dataset``.
        threshold: The lowest score that earns reward 1.
        timeout: Wall-clock seconds per score.
        pool: A pool from :func:`make_pool` to reuse (None: a pool for this call).

    Returns:
        One verdict per completion: ``reward``, ``status`` (correct | wrong | unparseable | too_long |
        timeout | error), ``detail``, ``answer`` (the extracted text) and ``steps_valid`` (None).

    Raises:
        ValueError: If the lengths differ.
    """
    if len(completions) != len(entries):
        raise ValueError(f"got {len(completions)} completions but {len(entries)} entries")
    verdicts: list[dict | None] = [None] * len(completions)
    todo = []
    for i, (completion, entry) in enumerate(zip(completions, entries, strict=True)):
        answer = extract_answer(completion)
        if answer is None:
            verdicts[i] = _verdict(0.0, "unparseable", f"no final '{ANSWER_MARKER} ...' found", None)
        elif len(answer) > _answer_cap(entry):
            detail = f"answer has {len(answer):,} characters (> {_answer_cap(entry):,}): not scored"
            verdicts[i] = _verdict(0.0, "too_long", detail, None)
        else:
            todo.append((i, answer))
    scores = _scores(
        [a for _, a in todo],
        [entries[i] for i, _ in todo],
        dataset=dataset,
        config=config or {},
        pool=pool,
        timeout=timeout,
    )
    for (i, answer), score in zip(todo, scores, strict=True):
        if isinstance(score, dict):
            verdicts[i] = _verdict(0.0, score["failed"], score["detail"], answer)
        elif score >= threshold:
            verdicts[i] = _verdict(1.0, "correct", f"score {score:g} >= threshold {threshold:g}", answer)
        else:
            verdicts[i] = _verdict(0.0, "wrong", f"score {score:g} < threshold {threshold:g}", answer)
    return verdicts


def answer_classes(
    entries: list[dict],
    answers: list[list[str | None]],
    *,
    dataset: str,
    config: dict | None = None,
    threshold: float = 1.0,
    timeout: float = 5.0,
    pool: DeadlinePool | None = None,
) -> list[list[int | None]]:
    """Classes of each problem's sampled answers (for maj@k).

    Class 0 holds the answers ``score_answer`` judges correct (exactly those :func:`verify_batch`
    rewards); other answers share a class when their text is the same; None stays None. An answer whose
    scoring fails (timeout, error) or that is too long counts as wrong.

    Raises:
        ValueError: If the lengths differ.
    """
    if len(entries) != len(answers):
        raise ValueError(f"got {len(entries)} entries but answers for {len(answers)} problems")
    distinct = [list(dict.fromkeys(a for a in per if a is not None)) for per in answers]
    pairs = [(p, t) for p, texts in enumerate(distinct) for t in texts if len(t) <= _answer_cap(entries[p])]
    scores = _scores(
        [t for _, t in pairs],
        [entries[p] for p, _ in pairs],
        dataset=dataset,
        config=config or {},
        pool=pool,
        timeout=timeout,
    )
    correct = {
        pair for pair, s in zip(pairs, scores, strict=True) if not isinstance(s, dict) and s >= threshold
    }
    result = []
    for p, per in enumerate(answers):
        ids: dict[str, int] = {}
        classes: list[int | None] = []
        for answer in per:
            if answer is None:
                classes.append(None)
            elif (p, answer) in correct:
                classes.append(0)
            else:
                classes.append(ids.setdefault(answer, len(ids) + 1))
        result.append(classes)
    return result
