"""Snapshot building at scale: the project's build_snapshot against the same steps in pandas.

Command: ``.venv/bin/python benchmarks/snapshot.py`` (``--samples 1000000`` by default).

Generates N synthetic E-step samples (~200-character completions; K samples per problem, some exact
duplicates, half judged correct) as sample and verdict parquet shards in the run-directory layout,
then builds the snapshot twice, each in its own child process: ``factory.snapshot.build_snapshot`` (read
shards, join verdicts, keep correct, dedupe, cap per problem, write the Hugging Face dataset, card and
manifest) and the same steps written with pandas (``pd.read_parquet``, ``merge``, ``drop_duplicates``,
``groupby().cumcount()``, ``Dataset.from_pandas(...).save_to_disk``, the same card). Reports each one's
wall time of the build (imports excluded), peak memory (the child's own VmHWM) and checks
that both kept the same rows. Targets (issue 8): <= 10 s and <= 2 GB for 1M samples on 2 cores, >= 3x pandas.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "a",
    "in",
    "is",
    "it",
    "that",
    "was",
    "for",
    "on",
    "are",
    "as",
    "with",
    "he",
    "they",
    "at",
    "be",
    "this",
    "have",
    "from",
    "or",
    "one",
    "had",
    "by",
]


def generate(root: Path, *, num_samples: int, per_problem: int, num_shards: int, seed: int) -> None:
    """Writes ``root/samples/shard-*.parquet`` and ``root/verdicts/shard-*.parquet`` (one to one)."""
    rng = np.random.default_rng(seed)
    num_problems = num_samples // per_problem
    vocab = np.array(WORDS)
    variants = 24
    # One random text per (problem, variant): nearly every completion is distinct text, as in a real
    # E-step, so parquet cannot shrink them to a small dictionary.
    words = rng.integers(0, len(vocab), size=(num_problems * variants, 40))
    pool = [" ".join(row)[:190] + " Answer: " for row in vocab[words].tolist()]
    pid = np.repeat(np.arange(num_problems), per_problem)
    sidx = np.tile(np.arange(per_problem), num_problems).astype(np.int32)
    # Each sample is one of 24 completions of its problem: exact duplicates are common, as in real E-steps.
    variant = rng.integers(0, variants, size=pid.size)
    pick = pid * variants + variant
    correct = rng.random(pid.size) < 0.5
    (root / "samples").mkdir(parents=True, exist_ok=True)
    (root / "verdicts").mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, num_problems, num_shards + 1).astype(int) * per_problem
    for shard, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        p = pid[lo:hi]
        ids = pl.Series("problem_id", p).cast(pl.String).str.zfill(7).str.replace(r"^", "synth-")
        completion = pl.Series(
            [f"{pool[i]}{n} ({v})" for i, n, v in zip(pick[lo:hi], p, variant[lo:hi], strict=True)]
        )
        samples = pl.DataFrame(
            {
                "problem_id": ids,
                "sample_idx": sidx[lo:hi],
                "prompt": pl.Series([f"Question {i}: what is the answer?" for i in p]),
                "completion": completion,
                "num_tokens": pl.Series((completion.str.len_chars()).cast(pl.Int32)),
                "finish_reason": pl.Series(["stop"] * (hi - lo)),
                "policy": pl.Series(["runs/bench/iter_0/model"] * (hi - lo)),
                "seed": pl.Series([seed] * (hi - lo), dtype=pl.Int64),
            }
        )
        ok = correct[lo:hi]
        verdicts = pl.DataFrame(
            {
                "problem_id": ids,
                "sample_idx": sidx[lo:hi],
                "reward": ok.astype(np.float64),
                "status": np.where(ok, "correct", "wrong"),
                "detail": pl.Series([""] * (hi - lo)),
                "answer": p.astype(str),
                "steps_valid": pl.Series([None] * (hi - lo), dtype=pl.Boolean),
            }
        )
        samples.write_parquet(root / "samples" / f"shard-{shard:05d}.parquet")
        verdicts.write_parquet(root / "verdicts" / f"shard-{shard:05d}.parquet")


def build_with_pandas(
    *, samples_dir: Path, verdicts_dir: Path, out_dir: Path, max_per_problem: int, dedupe: bool
) -> dict:
    """The same steps as ``factory.snapshot.build_snapshot``, written with pandas (the comparison)."""
    import pandas as pd
    from datasets import Dataset, DatasetDict

    from factory.rundir import write_json, write_text
    from factory.snapshot import DATASET_COLUMNS, dataset_card, fingerprint

    key = ["problem_id", "sample_idx"]
    samples_paths = sorted(Path(samples_dir).glob("shard-*.parquet"))
    verdicts_paths = sorted(Path(verdicts_dir).glob("shard-*.parquet"))
    samples = pd.concat([pd.read_parquet(p) for p in samples_paths], ignore_index=True)
    verdicts = pd.concat([pd.read_parquet(p) for p in verdicts_paths], ignore_index=True)
    if len(samples) != len(verdicts):
        raise ValueError("verification is incomplete")
    joined = samples.merge(
        verdicts.drop(columns=[c for c in verdicts if c in samples and c not in key]), on=key
    )
    if len(joined) != len(samples):
        raise ValueError("samples and verdicts do not match one to one")
    correct = joined[joined["reward"] > 0].sort_values(key, kind="stable")
    deduped = (
        correct.drop_duplicates(subset=["problem_id", "completion"], keep="first") if dedupe else correct
    )
    kept = deduped[deduped.groupby("problem_id", sort=False).cumcount() < max_per_problem]
    counts = {
        "num_samples": len(joined),
        "status_counts": dict(sorted(joined["status"].value_counts().items())),
        "num_correct": len(correct),
        "num_after_dedupe": len(deduped),
        "num_kept": len(kept),
        "num_problems": joined["problem_id"].nunique(),
        "num_problems_solved": kept["problem_id"].nunique(),
    }
    manifest = {
        "fingerprint": fingerprint(samples_paths + verdicts_paths, {}),
        "iteration": 1,
        "max_per_problem": max_per_problem,
        "dedupe": dedupe,
        **counts,
        "settings": {},
    }
    kept = kept[[c for c in DATASET_COLUMNS if c in kept]].reset_index(drop=True)
    DatasetDict({"train": Dataset.from_pandas(kept, preserve_index=False)}).save_to_disk(str(out_dir))
    write_json(Path(out_dir) / "manifest.json", manifest)
    write_text(Path(out_dir) / "README.md", dataset_card(manifest))
    return manifest


def _child(which: str, data: Path, out_dir: Path, result: Path) -> None:
    """One build in this (child) process; imports are done before the clock starts."""
    import datasets

    from factory.snapshot import build_snapshot

    datasets.disable_progress_bars()
    kwargs = {
        "samples_dir": data / "samples",
        "verdicts_dir": data / "verdicts",
        "out_dir": out_dir,
        "max_per_problem": 10,
        "dedupe": True,
    }
    start = time.perf_counter()
    if which == "factory":
        manifest = build_snapshot(**kwargs, lineage={"iteration": 1}, settings={})
    else:
        manifest = build_with_pandas(**kwargs)
    seconds = time.perf_counter() - start
    peak_mb = _peak_rss_mb()  # before the check below loads the result again
    kept = datasets.load_from_disk(str(out_dir))["train"]
    digest = pl.from_arrow(kept.data.table).select(["problem_id", "sample_idx"]).hash_rows().sum()
    result.write_text(
        json.dumps({"seconds": seconds, "num_kept": manifest["num_kept"], "rows": digest, "peak_mb": peak_mb})
    )


def _peak_rss_mb() -> float | None:
    """This process's own peak RSS (VmHWM). ``wait4``'s ru_maxrss is not used on Linux: it also counts the
    parent's RSS at fork time (the kernel carries the old address space's high-water mark across exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _run_child(which: str, data: Path, work: Path) -> dict:
    """Runs one build in a fresh process; returns its timing, kept count and peak RSS (os.wait4)."""
    result, out_dir = work / f"{which}.json", work / f"{which}-dataset"
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", which, str(data), str(out_dir), str(result)]
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"the {which} build failed (status {status})")
    reported = json.loads(result.read_text())
    if reported.get("peak_mb") is None:  # no /proc: fall back to wait4 (an upper bound, see _peak_rss_mb)
        reported["peak_mb"] = usage.ru_maxrss / 1024
    return {**reported, "process_seconds": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1_000_000, help="synthetic samples (default 1M)")
    parser.add_argument("--per-problem", type=int, default=32, help="samples per problem, K (default 32)")
    parser.add_argument("--shards", type=int, default=20, help="parquet shards per stage (default 20)")
    parser.add_argument("--work-dir", type=Path, default=None, help="where to write (default: a temp dir)")
    parser.add_argument(
        "--child", nargs=4, metavar=("WHICH", "DATA", "OUT", "RESULT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        which, data, out_dir, result = args.child
        _child(which, Path(data), Path(out_dir), Path(result))
        return
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        generate(
            work / "data",
            num_samples=args.samples,
            per_problem=args.per_problem,
            num_shards=args.shards,
            seed=0,
        )
        size_mb = sum(p.stat().st_size for p in (work / "data").rglob("*.parquet")) / 2**20
        print(
            f"generated {args.samples:,} samples ({args.per_problem} per problem, {args.shards} shards, "
            f"{size_mb:.0f} MB of parquet) in {time.perf_counter() - start:.1f} s"
        )
        results = {which: _run_child(which, work / "data", work) for which in ("factory", "pandas")}
    ours, theirs = results["factory"], results["pandas"]
    if (ours["num_kept"], ours["rows"]) != (theirs["num_kept"], theirs["rows"]):
        raise SystemExit(f"the two builds kept different rows: {ours} vs {theirs}")
    print(f"\nkept {ours['num_kept']:,} samples (both builds kept the same rows)\n")
    print("| build | build time (s) | process wall incl. imports (s) | peak RSS (MB) |")
    print("|---|---|---|---|")
    for which, r in results.items():
        name = "factory.snapshot.build_snapshot (polars)" if which == "factory" else "same steps in pandas"
        print(f"| {name} | {r['seconds']:.2f} | {r['process_seconds']:.2f} | {r['peak_mb']:.0f} |")
    speedup = theirs["seconds"] / ours["seconds"]
    print(f"\nspeed-up over pandas: {speedup:.1f}x (target >= 3x); targets: <= 10 s, <= 2048 MB")


if __name__ == "__main__":
    main()
