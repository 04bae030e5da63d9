"""Code verifier: run a completion's program against the problem's unit tests in the sandbox.

A problem is judged by one of two kinds of tests:

* function tests (HumanEval, MBPP, APPS call-based): ``code_prefix`` (HumanEval's prompt, else "") plus the
  completion's code is the program; ``tests`` are snippets (HumanEval: ``check(entry_point)`` with the
  problem's ``test`` code as ``prelude``; MBPP: one ``assert`` each; APPS: generated asserts on
  ``candidate``), each run and recorded separately;
* stdin/stdout tests (APPS): one sandbox job per case, stdout compared line by line (trailing whitespace
  and trailing blank lines ignored).

Verdict statuses: ``correct`` (every test ran to the end and passed, proven by the harness),
``wrong`` (tests ran, one failed), ``unparseable`` (no code, or a syntax error), ``timeout`` and ``error``
(the program crashed on load, exited before the tests finished, or hit the memory / output limits).
``test_results`` holds one character per test: ``P`` passed, ``F`` failed, ``-`` not run.
"""

from __future__ import annotations

import re

from factory.verifiers.sandbox import JobResult, Limits, Sandbox

# A fenced block: ```python / ```py / ``` (an unclosed fence runs to the end: a truncated completion).
_FENCE_RE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\r?\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def extract_code(completion: str) -> str:
    """The code of a completion: its first fenced Python block, else the completion itself."""
    match = _FENCE_RE.search(completion)
    return match.group(1) if match else completion


def build_program(problem: dict, completion: str) -> str:
    """The program to run: the extracted code, after ``code_prefix`` when the code continues it.

    A HumanEval completion either continues the prompt (a function body) or restates the whole
    function; in the second case the prompt still comes first, so its imports and helpers are defined.
    """
    code = extract_code(completion)
    prefix = problem.get("code_prefix") or ""
    if not prefix:
        return code
    entry = problem.get("entry_point")
    if entry and re.search(rf"^def\s+{re.escape(entry)}\s*\(", code, re.MULTILINE):
        return prefix + "\n" + code
    return prefix + code


def payloads_for(problem: dict, completion: str) -> list[dict]:
    """The sandbox jobs that judge one completion (one for function tests, one per stdio case)."""
    program = build_program(problem, completion)
    if problem.get("io_tests") is not None:
        return [{"mode": "stdio", "program": program, "stdin": case["input"]} for case in problem["io_tests"]]
    payload = {"mode": "function", "program": program, "tests": list(problem["tests"])}
    if problem.get("prelude"):
        payload["prelude"] = problem["prelude"]
    for key in ("call", "entry_point"):
        if problem.get(key):
            payload[key] = problem[key]
    return [payload]


def normalize_output(text: str) -> list[str]:
    """stdout as lines without trailing whitespace or trailing blank lines (APPS' lenient comparison)."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _verdict(reward: float, status: str, detail: str, tests: str = "") -> dict:
    return {"reward": reward, "status": status, "detail": detail[:500], "answer": None, "test_results": tests}


def judge(problem: dict, results: list[JobResult]) -> dict:
    """Turn the sandbox results of one completion into a verdict."""
    marks, first_problem = [], None
    for position, result in enumerate(results):
        if result.status == "timeout":
            return _verdict(
                0.0, "timeout", f"test job {position} passed the wall-clock limit", "".join(marks)
            )
        if result.status != "finished":
            tail = result.stderr.strip().splitlines()[-1:] or [result.detail]
            return _verdict(
                0.0,
                "error",
                f"{result.status}: {result.detail or 'no proof'} (exit code {result.exit_code}); "
                f"stderr: {tail[0][:200]}",
                "".join(marks),
            )
        report = result.report or {}
        if report.get("syntax_error"):
            return _verdict(0.0, "unparseable", f"syntax error: {report['syntax_error']}")
        if report.get("error"):
            return _verdict(
                0.0, "error", report["error"], "".join(marks) + "-" * len(report.get("tests", []))
            )
        tests = report.get("tests") or []
        if problem.get("io_tests") is not None:
            expected = problem["io_tests"][position]["output"]
            ok = bool(tests) and tests[0]["passed"]
            ok = ok and normalize_output(result.stdout) == normalize_output(expected)
            marks.append("P" if ok else "F")
            if not ok and first_problem is None:
                got = (
                    tests[0]["error"]
                    if tests and not tests[0]["passed"]
                    else f"stdout {result.stdout[:80]!r}"
                )
                first_problem = f"case {position}: {got}, expected {expected[:80]!r}"
            continue
        for number, test in enumerate(tests):
            marks.append("P" if test["passed"] else "F")
            if not test["passed"] and first_problem is None:
                first_problem = f"test {number}: {test['error']}"
        if len(tests) != len(problem["tests"]):
            return _verdict(0.0, "error", "the harness reported a different number of tests", "".join(marks))
    joined = "".join(marks)
    if not joined:
        return _verdict(0.0, "error", "the problem has no tests")
    if first_problem is None:
        return _verdict(1.0, "correct", f"all {len(joined)} tests passed", joined)
    return _verdict(0.0, "wrong", first_problem, joined)


def make_sandbox(*, timeout: float = 5.0, workers: int = 2, memory_mb: int = 1024) -> Sandbox:
    """A reusable sandbox for :func:`verify_batch` (use it as a context manager)."""
    return Sandbox(workers=workers, limits=Limits(timeout=timeout, memory_mb=memory_mb))


def verify_batch(
    problems: list[dict],
    completions: list[str],
    *,
    timeout: float = 5.0,
    workers: int = 2,
    sandbox: Sandbox | None = None,
) -> list[dict]:
    """Judge completions against their problems' tests, in parallel sandboxed processes.

    Args:
        problems: Problem dicts (``tests`` / ``io_tests``, optional ``code_prefix``, ``prelude``, ``call``).
        completions: Model outputs, one per problem.
        timeout: Wall-clock seconds per sandbox job.
        workers: Jobs run at once (ignored when ``sandbox`` is given).
        sandbox: A sandbox from :func:`make_sandbox` to reuse across calls.

    Returns:
        One verdict per completion, in input order: ``reward``, ``status``, ``detail``, ``answer`` (None:
        code has no final answer to vote on) and ``test_results``.

    Raises:
        ValueError: If the lengths differ.
    """
    if len(problems) != len(completions):
        raise ValueError(f"got {len(problems)} problems but {len(completions)} completions")
    verdicts: list[dict | None] = [None] * len(problems)
    jobs, owners = [], []
    for i, (problem, completion) in enumerate(zip(problems, completions, strict=True)):
        if not isinstance(completion, str) or not extract_code(completion).strip():
            verdicts[i] = _verdict(0.0, "unparseable", "no code in the completion")
            continue
        for payload in payloads_for(problem, completion):
            jobs.append(payload)
            owners.append(i)
    own = sandbox is None
    box = sandbox or make_sandbox(timeout=timeout, workers=workers)
    try:
        results = box.run(jobs, limits=Limits(**{**box.limits.__dict__, "timeout": timeout}))
    finally:
        if own:
            box.close()
    grouped: dict[int, list[JobResult]] = {}
    for owner, result in zip(owners, results, strict=True):
        grouped.setdefault(owner, []).append(result)
    for i, group in grouped.items():
        verdicts[i] = judge(problems[i], group)
    return verdicts  # type: ignore[return-value]
