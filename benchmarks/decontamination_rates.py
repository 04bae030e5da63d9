"""False-positive rates and speed of the decontamination check (README "Decontamination").

For each training set, every training problem's statement, and its human solution as a stand-in for a
correct completion, is checked against the run's evaluation texts (``factory.decontaminate``: the
statements and gold solutions of the evaluation splits the config gives, word 13-grams unless
``snapshot.ngram`` says otherwise), with the project's own ``OverlapIndex`` and ``training_overlaps``.
Then the snapshot's check (``drop_overlapping``) is timed on 20,000 rows (2,000 GSM8K training prompts x
10 completions of 200 words, made of other training solutions' words) against GSM8K's test set::

    .venv/bin/python benchmarks/decontamination_rates.py [--data-dir ../shared/datasets] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time

import polars as pl

from factory.config import compose
from factory.decontaminate import (
    OverlapIndex,
    drop_overlapping,
    evaluation_texts,
    training_overlaps,
    words,
)
from factory.tasks import build_task

# (row label, compose overrides; the data dir is added to the benchmark tasks)
SETS = (
    ("arith default", [], False),
    ("arith demo", ["experiment=arith_demo"], False),
    ("GSM8K", ["task=gsm8k"], True),
    ("GSM8K at n = 8 instead", ["task=gsm8k", "snapshot.ngram=8"], True),
    ("MBPP", ["task=mbpp"], True),
    ("HumanEval, MBPP-as-functions train", ["task=humaneval"], True),
)


def _count(found: int, total: int) -> str:
    return f"{found:,} ({100 * found / total:.{2 if found / total < 0.01 else 1}f}%)" if found else "0"


def measure(overrides: list[str]) -> dict:
    """Overlapping statements and solutions of one config's training problems."""
    cfg = compose(overrides)
    task = build_task(cfg.task, data_dir=cfg.paths.data_dir)
    texts = evaluation_texts(task, cfg)
    index = OverlapIndex(texts, n=int(cfg.snapshot.ngram))
    train = task.load_problems(split="train")
    statements = training_overlaps(train, index)
    solutions = sum(index.find(p["solution"]) is not None for p in train)
    sizes = {s: len(task.load_problems(split=s)) for s in index.splits}
    return {
        "n": index.n,
        "num_train": len(train),
        "eval": " + ".join(f"{k:,} {s}" for s, k in sizes.items()),
        "num_too_short": index.num_too_short,
        "statements": len(statements),
        "solutions": solutions,
    }


def time_check(data_dir: str, *, rows: int, samples: int, length: int, rounds: int, seed: int) -> dict:
    """Seconds of ``drop_overlapping`` on ``rows`` rows of ``length``-word completions vs GSM8K's test."""
    cfg = compose(["task=gsm8k", f"paths.data_dir={data_dir}"])
    task = build_task(cfg.task, data_dir=cfg.paths.data_dir)
    texts = evaluation_texts(task, cfg)
    start = time.perf_counter()
    index = OverlapIndex(texts, n=int(cfg.snapshot.ngram))
    build_s = time.perf_counter() - start
    train = task.load_problems(split="train")
    pool = [w for p in train for w in p["solution"].split()]
    rng = random.Random(seed)
    problems = train[: rows // samples]
    data = {"problem_id": [], "sample_idx": [], "prompt": [], "completion": []}
    for problem in problems:
        prompt = task.format_prompt(problem)
        for k in range(samples):
            at = rng.randrange(len(pool) - length)
            data["problem_id"].append(problem["problem_id"])
            data["sample_idx"].append(k)
            data["prompt"].append(prompt)
            data["completion"].append(" ".join(pool[at : at + length]))
    frame = pl.DataFrame(data)
    statements = {p["problem_id"]: p["question"] for p in problems}  # what snapshots check (not prompts)
    seconds, kept = [], None
    for _ in range(rounds):
        start = time.perf_counter()
        clean, found = drop_overlapping(frame, index, statements=statements)
        seconds.append(time.perf_counter() - start)
        kept = (clean.height, found["num_dropped_prompt"], found["num_dropped_completion"])
    return {
        "rows": frame.height,
        "mean_words": statistics.mean(len(words(c)) for c in data["completion"][:1000]),
        "num_texts": index.num_texts,
        "build_s": build_s,
        "seconds": seconds,
        "kept": kept,
    }


def _cpu() -> str:
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="../shared/datasets", help="paths.data_dir of the benchmarks")
    parser.add_argument("--rows", type=int, default=20_000, help="rows of the timed check")
    parser.add_argument("--samples", type=int, default=10, help="completions per prompt in the timed check")
    parser.add_argument("--words", type=int, default=200, help="words per completion in the timed check")
    parser.add_argument("--rounds", type=int, default=3, help="timed passes (the median is shown)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print(
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} | {platform.platform()} | {_cpu()} | "
        f"{os.cpu_count()} logical cores | load avg {os.getloadavg()[0]:.2f} | Python {platform.python_version()}"
    )
    print()
    print("| training set vs evaluation set | statements overlapping | solutions overlapping |")
    print("|---|---|---|")
    for label, overrides, needs_data in SETS:
        extra = [f"paths.data_dir={args.data_dir}"] if needs_data else []
        r = measure(overrides + extra)
        what = label if r["n"] != 13 else f"{label}, {r['num_train']:,} train vs {r['eval']}"
        print(
            f"| {what} | {_count(r['statements'], r['num_train'])} | {_count(r['solutions'], r['num_train'])} |",
            flush=True,
        )
    print()
    t = time_check(
        args.data_dir,
        rows=args.rows,
        samples=args.samples,
        length=args.words,
        rounds=args.rounds,
        seed=args.seed,
    )
    print(
        f"drop_overlapping: {t['rows']:,} rows of {t['mean_words']:.0f}-word completions vs GSM8K's test set "
        f"({t['num_texts']:,} texts): {statistics.median(t['seconds']):.1f} s median of "
        f"{', '.join(f'{s:.1f}' for s in t['seconds'])} s (index built in {t['build_s']:.2f} s; "
        f"kept {t['kept'][0]:,}, dropped prompt {t['kept'][1]}, completion {t['kept'][2]})"
    )


if __name__ == "__main__":
    main()
