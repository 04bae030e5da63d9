"""Command line verifier: ``python -m factory.verifiers TASK IN.jsonl OUT.jsonl``.

Each input row holds the task's problem fields plus ``completion``; each output row (same order)
is ``{"reward", "status", "detail", "answer"}`` (code tasks add ``test_results``). Code rows: HumanEval
``task_id, prompt, test, entry_point``; MBPP ``task_id, test_list`` (+ ``test_setup_code``); APPS
``problem_id, input_output`` (JSON with inputs, outputs and, call-based, fn_name). Input errors print one line on stderr and exit 2,
so a calling script can tell "bad input" apart from a crash (exit 1).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TASKS = ("arith", "math", "gsm8k", "math500", "humaneval", "mbpp", "apps")
CODE_TASKS = ("humaneval", "mbpp", "apps")
_OUTPUT_KEYS = ("reward", "status", "detail", "answer")


class UsageError(Exception):
    """Bad input; reported as one line on stderr with exit code 2."""


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise UsageError(f"input file not found: {path}")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise UsageError(f"{path}: bad JSON on line {number}: {error.msg}") from None
            if not isinstance(row, dict):
                raise UsageError(f"{path}: line {number} is not a JSON object")
            row["_line"] = number
            rows.append(row)
    return rows


def _field(row: dict, *names: str) -> object:
    """Return the first present field among ``names``; complain about the row if none is."""
    for name in names:
        if name in row:
            return row[name]
    raise UsageError(f"line {row['_line']}: missing field {' or '.join(repr(n) for n in names)}")


def _gold(task: str, row: dict) -> str | None:
    from factory.verifiers.math import extract_gold

    if task == "math":
        if "answer" in row:
            return str(row["answer"])
        return extract_gold(str(_field(row, "answer", "solution")), style="boxed")
    if task == "gsm8k":
        answer = str(_field(row, "answer"))
        # Accept both the raw GSM8K answer (working + "#### N") and a bare gold "N".
        return extract_gold(answer, style="gsm8k") if "####" in answer else answer.strip()
    return str(_field(row, "answer"))  # math500 (and arith, handled by the caller)


def _code_problem(task: str, row: dict) -> dict:
    """A code row as the verifier's problem dict (the same conversion as the tasks use)."""
    from factory.tasks import code_tasks

    try:
        if task == "humaneval":
            for name in ("task_id", "prompt", "test", "entry_point"):
                _field(row, name)
            return code_tasks.humaneval_problem({**row, "canonical_solution": row.get("canonical_solution")})
        if task == "mbpp":
            _field(row, "test_list")
            fields = {
                "task_id": row.get("task_id", 0),
                "code": row.get("code", ""),
                "text": row.get("text", ""),
            }
            return code_tasks.mbpp_problem({**row, **fields})
        _field(row, "input_output")
        problem = code_tasks.apps_problem(
            {"problem_id": row.get("problem_id", row["_line"]), "question": "", **row}
        )
    except (SyntaxError, ValueError, TypeError, KeyError) as error:
        raise UsageError(f"line {row['_line']}: bad {task} row: {error}") from None
    if problem is None:
        raise UsageError(f"line {row['_line']}: input_output has no usable inputs/outputs")
    return problem


def run(task: str, rows: list[dict], *, strictness: str | None, timeout: float, workers: int) -> list[dict]:
    """Judge parsed rows for ``task``; returns the output rows.

    Raises:
        UsageError: On a missing field or an argument that does not fit the task.
    """
    completions = [_field(row, "completion") for row in rows]
    if task in CODE_TASKS:
        if strictness is not None:
            raise UsageError("--strictness applies only to the arith task")
        from factory.verifiers.code import verify_batch

        problems = [_code_problem(task, row) for row in rows]
        verdicts = verify_batch(problems, completions, timeout=timeout, workers=workers)
        return [{key: v.get(key) for key in (*_OUTPUT_KEYS, "test_results")} for v in verdicts]
    if task == "arith":
        from factory.verifiers import arith

        golds = [_field(row, "answer") for row in rows]
        try:
            verdicts = arith.verify_batch(completions, golds, strictness=strictness or "answer")
        except ValueError as error:
            raise UsageError(str(error)) from None
    else:
        if strictness is not None:
            raise UsageError("--strictness applies only to the arith task")
        from factory.verifiers.math import verify_batch

        golds = [_gold(task, row) for row in rows]
        verdicts = verify_batch(completions, golds, timeout=timeout, workers=workers)
    return [{key: verdict.get(key) for key in _OUTPUT_KEYS} for verdict in verdicts]


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m factory.verifiers", description=__doc__.split("\n")[0])
    parser.add_argument("task", help=f"one of {', '.join(TASKS)}")
    parser.add_argument("input", type=Path, help="JSONL with the problem fields plus 'completion'")
    parser.add_argument("output", type=Path, help="JSONL verdicts, one per input row")
    parser.add_argument("--strictness", default=None, help="arith only: 'answer' (default) or 'steps'")
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="seconds per sample (per sandbox job for code)"
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="worker processes (sandbox jobs at once for code)"
    )
    args = parser.parse_args(argv)
    try:
        if args.task not in TASKS:
            raise UsageError(f"unknown task {args.task!r}; expected one of {', '.join(TASKS)}")
        if args.strictness not in (None, "answer", "steps"):
            raise UsageError(f"--strictness must be 'answer' or 'steps', got {args.strictness!r}")
        if args.timeout <= 0 or args.workers < 1:
            raise UsageError("--timeout must be > 0 and --workers >= 1")
        rows = _read_rows(args.input)
        out_rows = run(
            args.task, rows, strictness=args.strictness, timeout=args.timeout, workers=args.workers
        )
        try:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            with args.output.open("w", encoding="utf-8") as handle:
                for out_row in out_rows:
                    handle.write(json.dumps(out_row) + "\n")
        except OSError as error:
            raise UsageError(f"cannot write {args.output}: {error.strerror}") from None
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
