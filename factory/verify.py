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
from factory.judge import MAX_COMPLETION_CHARS, judge  # noqa: F401  (MAX_COMPLETION_CHARS: re-exported)
from factory.rundir import claim_partial, finish_partial, read_parquet, scan_shards

VERDICT_SCHEMA = {
    "problem_id": pl.String,
    "sample_idx": pl.Int32,
    "reward": pl.Float64,
    "status": pl.String,
    "detail": pl.String,
    "answer": pl.String,
    "steps_valid": pl.Boolean,
    "test_results": pl.String,  # code tasks: one character per unit test (P / F / -)
}


def verify_samples(
    *, task, problems: list[dict], samples_dir: Path, out_dir: Path, inputs: dict | None = None
) -> dict:
    """Writes ``out_dir/shard-*.parquet`` with one verdict per sample (resumable per shard).

    ``inputs`` (``stage_inputs.verdicts_inputs``) are recorded in ``stage.json``; shards a stopped run of
    other inputs left are not resumed.
    """
    start = time.time()
    by_id = {p["problem_id"]: p for p in problems}
    out_dir = Path(out_dir)
    work = claim_partial(out_dir, inputs)
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
            verdicts = judge(task, [by_id[i] for i in samples["problem_id"]], samples["completion"].to_list())
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
    # Only the status column is read back: the counts stream over the shards.
    counts = dict(sorted(scan_shards(work).group_by("status").len().collect().iter_rows()))
    num_verdicts = sum(counts.values())
    finish_partial(
        work, out_dir, seconds=time.time() - start, num_verdicts=num_verdicts, status_counts=counts
    )
    return {"num_verdicts": num_verdicts, "status_counts": counts}


def run(cfg: DictConfig) -> dict:
    """Judges iteration ``iteration``'s samples (finished verdicts of the same inputs are skipped, ones of
    other inputs refused). The verdicts depend on the samples' recorded fingerprint and the verifier
    settings; whether the samples fit the config is the E-step's and the snapshot's check."""
    from factory.rundir import RunDir
    from factory.stage_inputs import check_stage, verdicts_inputs
    from factory.tasks import build_task

    run_dir = RunDir(cfg.paths.run_dir)
    run_dir.check_format()
    k = int(cfg.iteration)
    out, samples_dir = run_dir.stage(k, "verdicts"), run_dir.stage(k, "samples")
    inputs = verdicts_inputs(cfg, samples_dir)
    if run_dir.is_done(k, "verdicts"):
        check_stage(out, inputs)
        return {"skipped": str(out)}
    if not run_dir.is_done(k, "samples"):
        raise FileNotFoundError(f"no finished samples at {samples_dir}: run restem-sample first")
    task = build_task(cfg.task, data_dir=cfg.paths.data_dir)
    try:
        return verify_samples(
            task=task,
            problems=task.load_problems(split="train"),
            samples_dir=samples_dir,
            out_dir=out,
            inputs=inputs,
        )
    finally:
        task.close()  # the math verifier's worker processes


main = hydra_entry(run)
