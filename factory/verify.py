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
# Longer completions are not judged (status "too_long"): no real solution is this long, and a runaway
# generation must not stall the verifier (regexes and parsers are at least linear in the text).
MAX_COMPLETION_CHARS = 100_000


def judge(task, problems: list[dict], completions: list, *, strictness: str | None = None) -> list[dict]:
    """``task.verify`` made safe for any completion: never raises because of what a sample contains.

    Completions over ``MAX_COMPLETION_CHARS`` get status ``too_long`` without being parsed; text that is
    not valid UTF-8 (lone surrogates from a lenient decode) is judged with the bad characters replaced,
    and the verdict's text fields are made writable to parquet. ``strictness`` as in ``task.verify``
    (None: the task's own).
    """
    verdicts: list[dict | None] = [None] * len(completions)
    todo = []
    for i, text in enumerate(completions):
        if isinstance(text, str) and len(text) > MAX_COMPLETION_CHARS:
            verdicts[i] = {
                "reward": 0.0,
                "status": "too_long",
                "detail": f"completion has {len(text):,} characters (> {MAX_COMPLETION_CHARS:,}): not judged",
                "answer": None,
                "steps_valid": None,
            }
        else:
            todo.append(i)
    judged = (
        task.verify(
            [problems[i] for i in todo], [_valid_utf8(completions[i]) for i in todo], strictness=strictness
        )
        if todo
        else []
    )
    for i, verdict in zip(todo, judged, strict=True):
        verdicts[i] = {k: _valid_utf8(v) if isinstance(v, str) else v for k, v in verdict.items()}
    return verdicts


def _valid_utf8(text):
    if not isinstance(text, str):
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


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
