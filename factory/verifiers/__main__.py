"""Command line verifier: ``python -m factory.verifiers TASK IN.jsonl OUT.jsonl``.

Each input row holds the task's problem fields plus ``completion``; each output row (same order)
is ``{"reward", "status", "detail", "answer"}``. Input errors print one line on stderr and exit 2,
so a calling script can tell "bad input" apart from a crash (exit 1).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TASKS = ("arith", "math", "gsm8k", "math500")
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


def run(task: str, rows: list[dict], *, strictness: str | None, timeout: float, workers: int) -> list[dict]:
    """Judge parsed rows for ``task``; returns the output rows.

    Raises:
        UsageError: On a missing field or an argument that does not fit the task.
    """
    completions = [_field(row, "completion") for row in rows]
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
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per sample (math tasks)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (math tasks)")
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
