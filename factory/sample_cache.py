"""A content-addressed E-step cache: sweep points that ask for samples already drawn reuse them.

The key is a hash of what determines the samples (``versioning.sampling_inputs``): the policy's weights,
the problems, the prompts as the task renders them with the policy's tokenizer, every sampling setting
except the number of samples and the throughput keys, the model dtype and the iteration.
Entries live under ``<paths.cache_dir>/samples/<key>/K<n>/`` as copies of finished sample shards. A
request for K' samples per problem is served from the first K' samples (``sample_idx < K'``) of any
entry with K >= K'. That equals a fresh K'-sample run because sample j of problem i is seeded from
(sampler seed, problem, j) only (``sample.problem_seed``), not from K or the batching; the key fixes the
policy. Disable with ``sampler.cache=false``.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl
from omegaconf import DictConfig

from factory.rundir import STAGE_FILE, atomic_dir, mark_done, read_shards, write_json
from factory.versioning import digest

log = logging.getLogger(__name__)

ENTRY_FILE = "entry.json"


def sample_or_reuse(
    cfg: DictConfig,
    *,
    key_inputs: dict,
    policy,
    problems: list[dict],
    iteration: int,
    out_dir: Path,
    generate: Callable[[], dict],
    stage_inputs: dict | None = None,
) -> dict:
    """Fills the finished samples stage ``out_dir`` from the cache, or by calling ``generate()``.

    Args:
        cfg: the run's config (``sampler``, ``model.dtype``, ``paths.cache_dir``).
        key_inputs: what determines the samples (``versioning.sampling_inputs``); its hash is the key.
        policy: the sampling policy's folder (or Hub name).
        problems: the training problems, in the order the sampler sees them.
        iteration: the E-step's iteration.
        out_dir: the samples stage folder to fill.
        generate: runs the sampler into ``out_dir`` (the unchanged ``sample_problems(...)`` call).
        stage_inputs: recorded in the stage's ``stage.json`` when it is served from the cache.

    Returns:
        the sampler's result dict, or ``{"num_samples", "generated": 0, "cached_from"}`` on a hit.
    """
    if not cfg.sampler.cache:
        return generate()
    root = Path(cfg.paths.cache_dir) / "samples" / digest(key_inputs)
    k = int(cfg.sampler.num_samples)
    entry = find_entry(root, k)
    if entry is not None:
        try:
            result = _materialize(
                entry, Path(out_dir), k=k, problems=problems, policy=str(policy), cfg=cfg, inputs=stage_inputs
            )
            print(f"E-step iteration {iteration}: {result['num_samples']} samples reused from {entry}")
            return result
        except ValueError as err:  # a damaged entry is a miss, never a wrong answer
            log.warning("ignoring E-step cache entry %s: %s", entry, err)
    result = generate()
    _store(Path(out_dir), root / f"K{k:05d}", k=k, inputs=key_inputs)
    return result


def find_entry(root: Path, k: int) -> Path | None:
    """The smallest finished entry under ``root`` with at least ``k`` samples per problem."""
    if not root.is_dir():
        return None
    sizes = []
    for path in root.glob("K*"):
        if (path / STAGE_FILE).is_file() and path.name[1:].isdigit() and int(path.name[1:]) >= k:
            sizes.append((int(path.name[1:]), path))
    return min(sizes)[1] if sizes else None


def _store(samples_dir: Path, entry: Path, *, k: int, inputs: dict) -> None:
    """Copies a finished samples stage into the cache (another job may have stored it first)."""
    if not (samples_dir / STAGE_FILE).is_file() or (entry / STAGE_FILE).is_file():
        return
    start = time.time()
    try:
        with atomic_dir(entry) as tmp:
            for shard in sorted(samples_dir.glob("shard-*.parquet")):
                shutil.copy2(shard, tmp / shard.name)
            write_json(tmp / ENTRY_FILE, {"num_samples": k, "inputs": inputs, "source": str(samples_dir)})
            mark_done(tmp, seconds=time.time() - start, num_samples_per_problem=k)
    except FileExistsError:
        pass  # a concurrent sweep job stored the same entry: identical content by construction


def _materialize(
    entry: Path,
    out_dir: Path,
    *,
    k: int,
    problems: list[dict],
    policy: str,
    cfg: DictConfig,
    inputs: dict | None,
) -> dict:
    """Writes the first ``k`` samples of each problem from ``entry`` as a finished samples stage."""
    start = time.time()
    rows = read_shards(entry).filter(pl.col("sample_idx") < k)
    order = {p["problem_id"]: i for i, p in enumerate(problems)}
    counts = rows.group_by("problem_id").len()
    if counts.height != len(order) or counts["len"].min() != k or set(counts["problem_id"]) != set(order):
        raise ValueError(f"it does not hold {k} samples for each of the {len(order)} problems")
    # The rows name this run's policy path; its weights are the cached run's (same fingerprint).
    rows = (
        rows.with_columns(pl.lit(policy).alias("policy"))
        .with_columns(pl.col("problem_id").replace_strict(order, return_dtype=pl.Int64).alias("_order"))
        .sort(["_order", "sample_idx"])
    )
    size = int(cfg.sampler.shard_size)
    rows = rows.with_columns((pl.col("_order") // size).alias("_shard"))
    num_shards = (len(problems) + size - 1) // size
    with atomic_dir(out_dir) as tmp:
        for (shard_no,), part in rows.group_by("_shard", maintain_order=True):
            part.drop(["_order", "_shard"]).write_parquet(tmp / f"shard-{shard_no:05d}.parquet")
        mark_done(
            tmp,
            seconds=time.time() - start,
            num_problems=len(problems),
            num_samples=rows.height,
            num_shards=num_shards,
            policy=policy,
            cached_from=str(entry),
            inputs=inputs,
        )
    # A partly generated attempt from before is superseded by the complete cached one.
    shutil.rmtree(out_dir.with_name(f".{out_dir.name}.partial"), ignore_errors=True)
    return {
        "num_samples": rows.height,
        "generated": 0,
        "cached_from": str(entry),
        "seconds": time.time() - start,
    }
