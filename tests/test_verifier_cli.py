"""Round trips through ``python -m factory.verifiers`` and its input errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "factory.verifiers", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_arith_round_trip(tmp_path):
    rows = [
        {"problem": "3+4", "answer": 7, "completion": "3+4=7. Answer: 7"},
        {"problem": "3+4", "answer": "7", "completion": "3+4=8. Answer: 7"},
        {"problem": "3+4", "answer": 7, "completion": "no idea"},
    ]
    src, out = _write(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    result = _run("arith", str(src), str(out), "--strictness", "steps")
    assert result.returncode == 0, result.stderr
    verdicts = _read(out)
    assert [v["status"] for v in verdicts] == ["correct", "wrong", "unparseable"]
    assert [v["reward"] for v in verdicts] == [1.0, 0.0, 0.0]
    assert set(verdicts[0]) == {"reward", "status", "detail", "answer"}


def test_math_round_trip(tmp_path):
    pytest.importorskip("math_verify", reason="math-verify is not installed")
    rows = [
        {"problem": "p", "solution": "So $\\boxed{\\frac{1}{2}}$.", "completion": "It is \\boxed{0.5}."},
        {"problem": "p", "answer": "3", "completion": "\\boxed{3} or \\boxed{4}"},
        {"problem": "p", "answer": "5", "completion": "\\boxed{9^{9^{9^{9^{9}}}}}"},
        {"problem": "p", "answer": "6", "completion": "The answer is 6."},
    ]
    src, out = _write(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    result = _run("math", str(src), str(out), "--timeout", "2", "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert [v["status"] for v in _read(out)] == ["correct", "wrong", "timeout", "correct"]


def test_gsm8k_accepts_raw_answer(tmp_path):
    pytest.importorskip("math_verify", reason="math-verify is not installed")
    rows = [{"question": "q", "answer": "work\n#### 1,200", "completion": "#### 1200"}]
    src, out = _write(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    assert _run("gsm8k", str(src), str(out), "--workers", "1").returncode == 0
    assert _read(out)[0]["status"] == "correct"


@pytest.mark.parametrize(
    ("task", "rows", "extra", "message"),
    [
        ("algebra", [{"answer": 1, "completion": "x"}], [], "unknown task 'algebra'"),
        ("arith", None, [], "input file not found"),
        ("arith", [{"answer": 1, "completion": "x"}, "{not json"], [], "bad JSON on line 2"),
        ("arith", [{"answer": 1}], [], "line 1: missing field 'completion'"),
        ("math", [{"completion": "x"}], [], "missing field 'answer' or 'solution'"),
        ("arith", [{"answer": "x", "completion": "x"}], [], "gold answer must be an integer"),
        ("math500", [{"answer": "1", "completion": "x"}], ["--strictness", "steps"], "only to the arith"),
    ],
)
def test_clear_errors(tmp_path, task, rows, extra, message):
    src = tmp_path / "in.jsonl"
    if rows is not None:
        _write(src, rows)
    result = _run(task, str(src), str(tmp_path / "out.jsonl"), *extra)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
