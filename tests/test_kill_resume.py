"""Kill anywhere, resume exactly: SIGKILL the loop inside every stage, rerun the same command, and end
with the same run directory as an uninterrupted run.

The kills are deterministic: ``RESTEM_KILL_AT`` (factory/faults.py) makes the loop's own process SIGKILL
itself at a named point. One run directory is killed once inside each stage in turn (E-step mid-shard,
verification, snapshot write, M-step mid-epoch, eval), each kill followed by the same command, so every
rerun resumes from what the previous kill left; the finished directory is compared file by file with one
uninterrupted reference run (same samples, verdicts, snapshot, model weights, metrics; no leftovers).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from conftest import EASY_ARITH, SHRINK, processes_with

from factory.config import compose, ray_installed
from factory.faults import KILL_ENV
from factory.rundir import RunDir
from factory.versioning import FINGERPRINT_FILE

OVERRIDES = [
    *SHRINK,
    *EASY_ARITH,
    "name=kill",
    "loop.iterations=1",
    "loop.sft_baseline=false",
    "task.num_test=12",
    "sampler.cache=false",  # the E-step must really sample to be killed in it (the cache has its own tests)
    "trainer.checkpoint_every_n_steps=4",  # the M-step killed at step 10 resumes from its step-8 checkpoint
]
VOLATILE = {"seconds", "finished_at", "timings", "resumed_from_step"}  # run records: differ per run
ROOT = Path(__file__).resolve().parent.parent


def _paths(run_dir: Path, cache_dir: Path) -> list[str]:
    return [f"paths.run_dir={run_dir}", f"paths.cache_dir={cache_dir}"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run (in this process) and the base-model cache the killed runs share with it."""
    import factory.loop as loop

    root = tmp_path_factory.mktemp("kill")
    cache = root / "cache"
    cfg = compose(_paths(root / "reference", cache) + OVERRIDES)
    loop.run(cfg)
    return root / "reference", cache


def _restem(run_dir: Path, cache: Path, kill_at: str | None, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != KILL_ENV}
    if kill_at:
        env[KILL_ENV] = kill_at
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "from factory.loop import main; main()",
            *_paths(run_dir, cache),
            *OVERRIDES,
            *extra,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.slow
def test_kill_in_every_stage_then_resume_matches_uninterrupted_run(reference, tmp_path):
    ref_dir, cache = reference
    run_dir = RunDir(tmp_path / "killed")
    partial = run_dir.iteration(1)
    # (kill point, what must be on disk right after the kill: a stage started but not finished)
    kills = [
        ("sample.shard@2", lambda: _shards(partial / ".samples.partial") == ["shard-00000.parquet"]),
        ("verify.shard@1", lambda: _shards(partial / ".verdicts.partial") == ["shard-00000.parquet"]),
        ("snapshot.write", lambda: any(partial.glob(".dataset.tmp-*"))),
        ("train.step@10", lambda: not run_dir.stage(1, "model").exists()),
        ("eval.generate", lambda: not run_dir.stage(1, "eval").exists() and not run_dir.summary.exists()),
    ]
    stages = ["samples", "verdicts", "dataset", "model", "eval"]
    for n, (point, left_unfinished) in enumerate(kills):
        proc = _restem(run_dir.root, cache, point)
        assert proc.returncode == -signal.SIGKILL, f"not killed at {point}:\n{proc.stderr[-3000:]}"
        assert left_unfinished(), f"unexpected state after the kill at {point}"
        # Stages before the killed one finished; the killed one and those after it did not.
        assert [run_dir.is_done(1, s) for s in stages] == [i < n for i in range(len(stages))], point
    proc = _restem(run_dir.root, cache, None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_run(ref_dir, run_dir.root)
    # The M-step killed at step 10 went on from its step-8 checkpoint rather than starting over.
    assert json.loads((run_dir.stage(1, "model") / "stage.json").read_text())["resumed_from_step"] == 8

    samples = pl.read_parquet(run_dir.stage(1, "samples") / "*.parquet")
    cfg = compose(_paths(run_dir.root, cache) + OVERRIDES)
    assert samples.height == cfg.task.num_train * cfg.sampler.num_samples  # no duplicates, none missing
    assert samples.select(["problem_id", "sample_idx"]).is_unique().all()


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.skipif(not ray_installed(), reason="Ray is not installed: pip install -e '.[ray]'")
def test_loop_on_ray_killed_mid_e_step_resumes_to_the_local_run(reference, tmp_path):
    """``restem cluster=ray`` (a local Ray instance, 2 replicas) end to end: its driver killed with one
    E-step shard written, the same command again, and the run directory equals the local reference run
    (same samples, verdicts, snapshot, weights and eval metrics)."""
    ref_dir, cache = reference
    run_dir = RunDir(tmp_path / "killed")
    before = set(processes_with("ray::"))
    ray = ("cluster=ray", "cluster.num_gpus=0")  # replicas on CPUs, like the reference run
    proc = _restem(run_dir.root, cache, "sample.shard@2", *ray)
    assert proc.returncode == -signal.SIGKILL, f"not killed:\n{proc.stderr[-3000:]}"
    assert len(_shards(run_dir.iteration(1) / ".samples.partial")) == 1
    # Ray's dashboard and runtime-env agents outlive a SIGKILLed driver (the rest of Ray stops).
    for pid in set(processes_with("ray::")) - before:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc = _restem(run_dir.root, cache, None, *ray)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(2 Ray replicas)" in proc.stderr and "eval 1 on Ray" in proc.stderr
    _assert_same_run(ref_dir, run_dir.root)


def _shards(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("shard-*.parquet"))


def _files(root: Path) -> set[str]:
    # logs/ holds Hydra's per-command logs (the reference ran in-process and has none); a model folder's
    # weights-fingerprint cache (factory/versioning.py) is a cache, not a leftover.
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and p.parts[len(root.parts)] != "logs" and p.name != FINGERPRINT_FILE
    }


def _assert_same_run(ref: Path, got: Path) -> None:
    from datasets import load_from_disk
    from safetensors.torch import load_file

    files = _files(got)
    leftovers = [f for f in files if any(part.startswith(".") for part in Path(f).parts)]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    assert files == _files(ref)
    for rel in sorted(files):
        a, b = ref / rel, got / rel
        if "/dataset/" in f"/{rel}" and rel.endswith((".arrow", "state.json", "dataset_info.json")):
            continue  # compared below as a dataset (datasets' fingerprints are random per process)
        if rel.endswith(".parquet"):
            assert pl.read_parquet(a).equals(pl.read_parquet(b)), rel
        elif rel.endswith(".json"):
            _assert_close(_strip(json.loads(a.read_text())), _strip(json.loads(b.read_text())), rel)
        elif rel.endswith(".safetensors"):
            wa, wb = load_file(a), load_file(b)
            assert wa.keys() == wb.keys()
            for key in wa:
                assert (wa[key] - wb[key]).abs().max().item() <= 1e-5, f"{rel}: {key}"
        elif rel.endswith("dataset/README.md"):
            assert a.read_text() == b.read_text(), rel
    for folder in sorted({Path(rel).parent for rel in files if rel.endswith("dataset_dict.json")}):
        da, db = load_from_disk(str(ref / folder))["train"], load_from_disk(str(got / folder))["train"]
        assert pl.from_arrow(da.data.table).equals(pl.from_arrow(db.data.table)), str(folder)


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE and k != "model"}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _assert_close(a, b, where: str) -> None:
    if isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6), f"{where}: {a} != {b}"
    elif isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_close(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, str) and isinstance(b, str) and ("/reference" in a or "/killed" in a):
        pass  # paths inside the run directory differ by the run directory's name
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"
