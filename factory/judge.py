"""``judge``: a task's verifier made safe for any completion (the E-step's verify stage, evaluation and
selection on validation all judge through it). No stage imports here, so training code can use it."""

from __future__ import annotations

# Longer completions are not judged (status "too_long"): no real solution is this long, and a runaway
# generation must not stall the verifier (regexes and parsers are at least linear in the text).
MAX_COMPLETION_CHARS = 100_000


def judge(task, problems: list[dict], completions: list, *, strictness: str | None = None) -> list[dict]:
    """``task.verify`` made safe for any completion: never raises because of what a sample contains.

    Completions over ``MAX_COMPLETION_CHARS`` get status ``too_long`` without being parsed; text that is
    not valid UTF-8 (lone surrogates from a lenient decode) is judged with the bad characters replaced,
    and the verdict's text fields are made writable to parquet. ``strictness`` as in ``task.verify``
    (None: the task's own).
    """
    verdicts: list[dict | None] = [None] * len(completions)
    todo = []
    for i, text in enumerate(completions):
        if isinstance(text, str) and len(text) > MAX_COMPLETION_CHARS:
            verdicts[i] = {
                "reward": 0.0,
                "status": "too_long",
                "detail": f"completion has {len(text):,} characters (> {MAX_COMPLETION_CHARS:,}): not judged",
                "answer": None,
                "steps_valid": None,
            }
        else:
            todo.append(i)
    judged = (
        task.verify(
            [problems[i] for i in todo], [_valid_utf8(completions[i]) for i in todo], strictness=strictness
        )
        if todo
        else []
    )
    for i, verdict in zip(todo, judged, strict=True):
        verdicts[i] = {k: _valid_utf8(v) if isinstance(v, str) else v for k, v in verdict.items()}
    return verdicts


def _valid_utf8(text):
    if not isinstance(text, str):
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
