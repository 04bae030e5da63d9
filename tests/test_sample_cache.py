"""The content-addressed E-step cache and snapshot versions, through the stage commands.

The fewer-samples test uses a stand-in sampler whose sample j of problem i depends on (problem, j) only,
the property the real sampler's per-sample seeding gives, so it holds whatever the HF sampler's seeding.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import polars as pl
import pytest
from datasets import load_from_disk
from omegaconf import OmegaConf

from factory import sample, snapshot, verify
from factory.rundir import RunDir, atomic_dir, mark_done, read_shards
from factory.sample import SAMPLE_SCHEMA


def _boom(*args, **kwargs):
    raise AssertionError("the sampler was called")


def _per_sample_sampler(calls: list[int]):
    """A stand-in ``sample_problems``: sample j of a problem is a function of (problem, j) only."""

    def fake(
        *,
        model,
        tokenizer,
        task,
        problems,
        out_dir,
        settings,
        policy,
        iteration,
        draw=0,
        sampler=None,
        dtype="float32",
        cluster=None,
        num_samples=None,
    ):
        assert num_samples is None  # no curriculum in these tests
        calls.append(int(settings.num_samples))
        rows = []
        for p in problems:
            for j in range(int(settings.num_samples)):
                h = int(hashlib.sha256(f"{p['problem_id']}|{j}".encode()).hexdigest(), 16)
                answer = p["answer"] if h % 3 else str(h % 50)
                rows.append(
                    {
                        "problem_id": p["problem_id"],
                        "sample_idx": j,
                        "prompt": task.format_prompt(p),
                        "completion": f"try {h % 7}. Answer: {answer}",
                        "num_tokens": 10,
                        "finish_reason": "stop",
                        "policy": policy,
                        "seed": 0,
                    }
                )
        with atomic_dir(out_dir) as tmp:
            pl.DataFrame(rows, schema=SAMPLE_SCHEMA).write_parquet(tmp / "shard-00000.parquet")
            mark_done(tmp, seconds=0.0, num_samples=len(rows))
        return {"num_samples": len(rows), "generated": len(rows)}

    return fake


def _point(make_cfg, tmp_path, name: str, *overrides: str):
    cfg = make_cfg("iteration=1", "task.strictness=answer", *overrides)
    OmegaConf.update(cfg, "paths.run_dir", str(tmp_path / name))
    return cfg


@pytest.fixture(scope="module")
def shared_base(tmp_path_factory):
    """The shrunken base model, pretrained once for this module (copied into each test's cache)."""
    from conftest import SHRINK

    from factory.base_model import ensure_base_model
    from factory.config import compose

    cache = tmp_path_factory.mktemp("base_cache")
    run = tmp_path_factory.mktemp("unused")
    overrides = [f"paths.run_dir={run}", f"paths.cache_dir={cache}", "name=test", *SHRINK]
    ensure_base_model(compose([*overrides, "iteration=1", "task.strictness=answer"]))
    return cache


@pytest.fixture
def make_point(make_cfg, tmp_path, shared_base):
    shutil.copytree(shared_base, tmp_path / "cache", dirs_exist_ok=True)
    return lambda name, *overrides: _point(make_cfg, tmp_path, name, *overrides)


def _sample_verify_snapshot(cfg) -> dict:
    result = sample.run(cfg)
    verify.run(cfg)
    manifest = snapshot.run(cfg)
    return {"sample": result, "manifest": manifest, "run": RunDir(cfg.paths.run_dir)}


def _rows(run: RunDir) -> list[dict]:
    return load_from_disk(str(run.stage(1, "dataset")))["train"].to_list()


def test_fewer_samples_are_served_from_a_larger_run(make_point, tmp_path, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(sample, "sample_problems", _per_sample_sampler(calls))
    big = _sample_verify_snapshot(make_point("k4", "sampler.num_samples=4"))
    assert calls == [4] and big["sample"]["generated"] == 160
    entries = list((tmp_path / "cache" / "samples").glob("*/K00004"))
    assert len(entries) == 1 and (entries[0] / "stage.json").is_file()

    # K=2 with the sampler booby-trapped: served from the K=4 entry's first two samples.
    monkeypatch.setattr(sample, "sample_problems", _boom)
    small = _sample_verify_snapshot(make_point("k2", "sampler.num_samples=2"))
    assert small["sample"]["generated"] == 0 and small["sample"]["cached_from"] == str(entries[0])
    # The same K=2 point generated from scratch (cache off) gives the same samples and snapshot.
    monkeypatch.setattr(sample, "sample_problems", _per_sample_sampler(calls))
    fresh = _sample_verify_snapshot(make_point("k2_fresh", "sampler.num_samples=2", "sampler.cache=false"))
    assert calls == [4, 2]
    cols = ["problem_id", "sample_idx", "prompt", "completion", "policy"]
    assert (
        read_shards(small["run"].stage(1, "samples"))
        .select(cols)
        .equals(read_shards(fresh["run"].stage(1, "samples")).select(cols))
    )
    assert small["manifest"]["num_kept"] > 0
    assert small["manifest"]["version"] == fresh["manifest"]["version"] != big["manifest"]["version"]
    assert _rows(small["run"]) == _rows(fresh["run"])

    # A different sampling setting is another key: nothing is reused.
    monkeypatch.setattr(sample, "sample_problems", _boom)
    with pytest.raises(AssertionError, match="sampler was called"):
        sample.run(make_point("t07", "sampler.num_samples=2", "sampler.temperature=0.7"))


@pytest.mark.slow
def test_rerunning_a_point_or_fewer_samples_generates_nothing(make_cfg, easy_arith, tmp_path, monkeypatch):
    first = _sample_verify_snapshot(_point(make_cfg, tmp_path, "a", *easy_arith))  # the real HF sampler
    assert first["sample"]["generated"] == 160 and first["manifest"]["num_kept"] > 0
    monkeypatch.setattr(sample, "sample_problems", _boom)
    monkeypatch.setattr(sample, "generate", _boom)
    again = _sample_verify_snapshot(_point(make_cfg, tmp_path, "b", *easy_arith))
    assert again["sample"]["generated"] == 0
    assert again["manifest"]["version"] == first["manifest"]["version"]
    assert again["manifest"]["name"] == first["manifest"]["name"]
    assert _rows(again["run"]) == _rows(first["run"])
    # Fewer samples than the cached run, with the real sampler: served from the cache, and equal to a
    # fresh run of the smaller point (sample j of a problem does not depend on K).
    small = _sample_verify_snapshot(_point(make_cfg, tmp_path, "c", *easy_arith, "sampler.num_samples=2"))
    assert small["sample"]["generated"] == 0
    monkeypatch.undo()
    fresh = _sample_verify_snapshot(
        _point(make_cfg, tmp_path, "d", *easy_arith, "sampler.num_samples=2", "sampler.cache=false")
    )
    assert fresh["sample"]["generated"] == 80
    cols = ["problem_id", "sample_idx", "completion", "num_tokens", "finish_reason", "seed"]
    assert (
        read_shards(small["run"].stage(1, "samples"))
        .select(cols)
        .equals(read_shards(fresh["run"].stage(1, "samples")).select(cols))
    )
    assert _rows(small["run"]) == _rows(fresh["run"])


def test_a_finished_snapshot_is_never_overwritten(make_point, monkeypatch):
    monkeypatch.setattr(sample, "sample_problems", _per_sample_sampler([]))
    cfg = make_point("run", "sampler.num_samples=2")
    done = _sample_verify_snapshot(cfg)
    dataset = done["run"].stage(1, "dataset")
    before = (dataset / "manifest.json").read_bytes()
    assert snapshot.run(cfg) == {"skipped": str(dataset)}  # same config: reused
    cfg.snapshot.max_per_problem = 1
    with pytest.raises(FileExistsError, match=r"never overwritten.*|changed: snapshot\.max_per_problem"):
        snapshot.run(cfg)
    assert (dataset / "manifest.json").read_bytes() == before
    manifest = json.loads(before)
    assert manifest["name"] == f"arith-iter1-{manifest['version'][:12]}"
    card = (dataset / "README.md").read_text()
    assert manifest["version"] in card and "restem:" in card and "policy_fingerprint" in card
