"""Throughput of the math verifier, and a gold-vs-own-gold audit of GSM8K, MATH-500 and MATH.

Benchmark (default): 10,000 MATH gold solutions used as completions, each paired with its own
gold, through ``verify_batch``'s process pool; then plain single-threaded math-verify
(``parse`` + ``verify`` in a loop in the main process) on a subset of the same inputs::

    nice -n 19 .venv/bin/python benchmarks/verify_math.py [--n 10000] [--baseline-n 2000]

Audit (``--audit``): every gold solution of GSM8K (train+test), MATH-500 and MATH (12,500)
judged against its own gold; prints the share judged correct and each MATH exception.

Mismatch audit (``--mismatch``): every gold solution judged against another problem's gold; the
false-positive rate counts only pairs whose two golds are not the same answer.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import time
from collections import Counter
from importlib.metadata import version
from pathlib import Path

from factory.verifiers.math import extract_gold, make_pool, verify_batch

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def _load(data_dir: Path, relative: str) -> list[dict]:
    with (data_dir / relative).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _machine() -> str:
    cpu = "unknown cpu"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        models = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line
        ]
        cpu = models[0] if models else cpu
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return (
        f"{datetime.datetime.now().isoformat(timespec='seconds')} | {platform.platform()} | {cpu} | "
        f"{os.cpu_count()} logical cores | load avg {load[0]:.2f} | Python {platform.python_version()} | "
        f"math-verify {version('math-verify')} | nice {os.nice(0)}"
    )


def benchmark(data_dir: Path, n: int, baseline_n: int, workers: int) -> None:
    """Time the pool on ``n`` MATH solutions and plain math-verify on ``baseline_n`` of them."""
    rows = _load(data_dir, "math/train.jsonl") + _load(data_dir, "math/test.jsonl")
    rows = random.Random(0).sample(rows, min(n, len(rows)))
    completions = [r["solution"] for r in rows]
    golds = [extract_gold(r["solution"], style="boxed") for r in rows]
    print(_machine())

    start = time.perf_counter()
    with make_pool(timeout=5.0, workers=workers) as pool:
        pool.map([("\\boxed{1}", "1")] * workers)  # start the workers outside the timed region
        startup = time.perf_counter() - start
        start = time.perf_counter()
        verdicts = verify_batch(completions, golds, timeout=5.0, pool=pool)
        elapsed = time.perf_counter() - start
    statuses = Counter(v["status"] for v in verdicts)
    print(
        f"pool ({workers} workers): {len(rows)} verdicts in {elapsed:.1f} s = {len(rows) / elapsed:.0f} verdicts/s "
        f"(+{startup:.1f} s worker start-up); statuses {dict(statuses)}"
    )

    import math_verify

    subset = list(zip(completions, golds, strict=True))[:baseline_n]
    start = time.perf_counter()
    correct = 0
    for completion, gold in subset:
        gold_parsed = math_verify.parse("$" + (gold or "") + "$")
        correct += bool(math_verify.verify(gold_parsed, math_verify.parse(completion)))
    elapsed = time.perf_counter() - start
    print(
        f"plain math-verify (main process, 1 thread): {len(subset)} verdicts in {elapsed:.1f} s = "
        f"{len(subset) / elapsed:.0f} verdicts/s; {correct}/{len(subset)} correct"
    )


def audit(data_dir: Path, workers: int) -> None:
    """Judge every gold solution against its own gold; list the MATH exceptions."""
    print(_machine())
    sets = _gold_sets(data_dir)
    math_rows = _load(data_dir, "math/train.jsonl") + _load(data_dir, "math/test.jsonl")
    with make_pool(timeout=10.0, workers=workers) as pool:
        for name, (completions, golds) in sets.items():
            start = time.perf_counter()
            verdicts = verify_batch(completions, golds, timeout=10.0, pool=pool)
            elapsed = time.perf_counter() - start
            correct = sum(v["status"] == "correct" for v in verdicts)
            statuses = dict(Counter(v["status"] for v in verdicts))
            print(
                f"{name}: {correct}/{len(verdicts)} = {100 * correct / len(verdicts):.2f}% correct "
                f"({elapsed:.0f} s); statuses {statuses}"
            )
            if name.startswith("MATH train"):
                for row, gold, verdict in zip(math_rows, golds, verdicts, strict=True):
                    if verdict["status"] != "correct":
                        print(
                            f"  {row['unique_id']}\tgold={gold!r}\t{verdict['status']}: {verdict['detail']}"
                        )


def _gold_sets(data_dir: Path) -> dict[str, tuple[list[str], list[str]]]:
    gsm = _load(data_dir, "gsm8k/train.jsonl") + _load(data_dir, "gsm8k/test.jsonl")
    math500 = _load(data_dir, "prm800k_math_splits/test.jsonl")
    math_rows = _load(data_dir, "math/train.jsonl") + _load(data_dir, "math/test.jsonl")
    return {
        "GSM8K train+test": (
            [r["answer"] for r in gsm],
            [extract_gold(r["answer"], style="gsm8k") for r in gsm],
        ),
        "MATH-500": ([r["solution"] for r in math500], [r["answer"] for r in math500]),
        "MATH train+test": (
            [r["solution"] for r in math_rows],
            [extract_gold(r["solution"], style="boxed") for r in math_rows],
        ),
    }


def mismatch_audit(data_dir: Path, workers: int) -> None:
    """Judge every gold solution against ANOTHER problem's gold (a seeded derangement).

    Different problems sometimes share an answer ("2"); a reward there is right, not a false
    positive. So the other gold is also compared with the problem's own gold (math-verify, gold
    against gold), and the false-positive rate is reported over the pairs whose golds differ.
    """
    print(_machine())
    with make_pool(timeout=10.0, workers=workers) as pool:
        for name, (solutions, golds) in _gold_sets(data_dir).items():
            order = list(range(len(golds)))
            random.Random(0).shuffle(order)
            other = [0] * len(golds)
            for a, b in zip(order, order[1:] + order[:1], strict=True):
                other[a] = b  # a cycle over a shuffled order: nobody gets their own gold
            paired = [golds[other[i]] for i in range(len(golds))]
            verdicts = verify_batch(solutions, paired, timeout=10.0, pool=pool)
            # A problem's own gold, written as a boxed answer, judged against the paired gold.
            same = verify_batch([f"\\boxed{{{g}}}" for g in golds], paired, timeout=10.0, pool=pool)
            rewarded = sum(v["reward"] > 0 for v in verdicts)
            different = [i for i, v in enumerate(same) if v["status"] != "correct"]
            false_pos = [i for i in different if verdicts[i]["reward"] > 0]
            print(
                f"{name}: {rewarded}/{len(golds)} = {100 * rewarded / len(golds):.2f}% rewarded against another "
                f"problem's gold; pairs with a different gold: {len(different)}, rewarded {len(false_pos)} "
                f"= {100 * len(false_pos) / max(1, len(different)):.3f}%"
            )
            for i in false_pos[:20]:
                print(f"  own gold {golds[i]!r} vs other {paired[i]!r}: {verdicts[i]['detail']}")


def main() -> None:
    """Parse arguments and run the benchmark or the audit."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data-dir", type=Path, default=Path(os.environ.get("RESTEM_DATA_DIR") or DEFAULT_DATA)
    )
    parser.add_argument("--n", type=int, default=10_000, help="completions for the pool benchmark")
    parser.add_argument("--baseline-n", type=int, default=2_000, help="completions for the plain baseline")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--audit", action="store_true", help="run the gold-vs-own-gold audit instead")
    parser.add_argument(
        "--mismatch", action="store_true", help="judge each gold solution against another's gold"
    )
    args = parser.parse_args()
    if args.mismatch:
        mismatch_audit(args.data_dir, args.workers)
    elif args.audit:
        audit(args.data_dir, args.workers)
    else:
        benchmark(args.data_dir, args.n, args.baseline_n, args.workers)


if __name__ == "__main__":
    main()
