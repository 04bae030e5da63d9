"""Verification stage: judge every sample of an iteration and write verdict shards beside the samples.

Command: ``restem-verify iteration=2``. Verdict shards mirror sample shards one to one.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import polars as pl
from omegaconf import DictConfig
from tqdm.auto import tqdm

from factory.config import hydra_entry
from factory.faults import kill_point
from factory.rundir import STAGE_FILE, mark_done, read_parquet, read_shards

VERDICT_SCHEMA = {
    "problem_id": pl.String,
    "sample_idx": pl.Int32,
    "reward": pl.Float64,
    "status": pl.String,
    "detail": pl.String,
    "answer": pl.String,
    "steps_valid": pl.Boolean,
}


def verify_samples(*, task, problems: list[dict], samples_dir: Path, out_dir: Path) -> dict:
    """Writes ``out_dir/shard-*.parquet`` with one verdict per sample (resumable per shard)."""
    start = time.time()
    by_id = {p["problem_id"]: p for p in problems}
    out_dir = Path(out_dir)
    work = out_dir.with_name(f".{out_dir.name}.partial")
    work.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    shard_paths = sorted(Path(samples_dir).glob("shard-*.parquet"))
    for path in tqdm(shard_paths, desc="verifying", unit="shard"):
        target = work / path.name
        if not target.exists():
            samples = read_parquet(path, ["problem_id", "sample_idx", "completion"])
            missing = set(samples["problem_id"].unique()) - by_id.keys()
            if missing:
                raise ValueError(
                    f"{path} has samples of unknown problems (e.g. {sorted(missing)[:3]}): "
                    "the task config changed since sampling; use a new paths.run_dir"
                )
            verdicts = task.verify([by_id[i] for i in samples["problem_id"]], samples["completion"].to_list())
            frame = pl.DataFrame(
                [
                    {"problem_id": pid, "sample_idx": idx, **{k: v[k] for k in VERDICT_SCHEMA if k in v}}
                    for pid, idx, v in zip(
                        samples["problem_id"], samples["sample_idx"], verdicts, strict=True
                    )
                ],
                schema=VERDICT_SCHEMA,
            )
            tmp = target.with_suffix(".parquet.tmp")
            frame.write_parquet(tmp)
            os.replace(tmp, target)
            kill_point("verify.shard")
    verdicts = read_shards(work)
    for status, n in verdicts.group_by("status").len().iter_rows():
        counts[status] = n
    mark_done(work, seconds=time.time() - start, num_verdicts=verdicts.height, status_counts=counts)
    os.replace(work, out_dir)
    return {"num_verdicts": verdicts.height, "status_counts": counts}


def run(cfg: DictConfig) -> dict:
    from factory.rundir import RunDir
    from factory.tasks import build_task

    run_dir = RunDir(cfg.paths.run_dir)
    k = int(cfg.iteration)
    if (run_dir.stage(k, "verdicts") / STAGE_FILE).exists():
        return {"skipped": str(run_dir.stage(k, "verdicts"))}
    if not run_dir.is_done(k, "samples"):
        raise FileNotFoundError(
            f"no finished samples at {run_dir.stage(k, 'samples')}: run restem-sample first"
        )
    task = build_task(cfg.task, data_dir=cfg.paths.data_dir)
    try:
        return verify_samples(
            task=task,
            problems=task.load_problems(split="train"),
            samples_dir=run_dir.stage(k, "samples"),
            out_dir=run_dir.stage(k, "verdicts"),
        )
    finally:
        task.close()  # the math verifier's worker processes


main = hydra_entry(run)
