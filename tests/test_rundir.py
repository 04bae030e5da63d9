"""The run-directory contract: atomic stages, finished stages never overwritten, version check."""

from __future__ import annotations

import subprocess

import pytest
from omegaconf import OmegaConf

from factory.rundir import RunDir, atomic_dir, mark_done, read_json, read_shards, write_json


def test_atomic_dir_only_appears_when_complete(tmp_path):
    final = tmp_path / "iter_1" / "dataset"
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "part").write_text("half")
        raise RuntimeError("crash")
    assert not final.exists()
    assert list((tmp_path / "iter_1").iterdir()) == []
    with atomic_dir(final) as tmp:
        (tmp / "part").write_text("whole")
        mark_done(tmp, seconds=1.0)
    assert (final / "part").read_text() == "whole"
    assert RunDir(tmp_path).is_done(1, "dataset")


def test_finished_stage_is_never_overwritten(tmp_path):
    final = tmp_path / "s"
    with atomic_dir(final) as tmp:
        mark_done(tmp, seconds=0)
        (tmp / "a").write_text("first")
    with pytest.raises(FileExistsError, match="never overwritten"), atomic_dir(final) as tmp:
        (tmp / "a").write_text("second")
    assert (final / "a").read_text() == "first"


def test_unfinished_leftover_is_replaced(tmp_path):
    final = tmp_path / "s"
    final.mkdir()
    (final / "junk").write_text("from a crash")
    with atomic_dir(final) as tmp:
        mark_done(tmp, seconds=0)
    assert not (final / "junk").exists()


def test_incompatible_run_dir_is_refused(tmp_path):
    cfg = OmegaConf.create({"a": 1})
    run_dir = RunDir(tmp_path)
    run_dir.init(cfg)
    run_dir.init(cfg)  # same version: fine
    write_json(tmp_path / "run_format.json", {"version": 999})
    with pytest.raises(RuntimeError, match="run format 999"):
        run_dir.init(cfg)


def test_corrupt_shard_and_json_are_named(tmp_path):
    (tmp_path / "shard-00000.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="corrupt parquet shard .*shard-00000.parquet"):
        read_shards(tmp_path)
    (tmp_path / "m.json").write_text("{broken")
    with pytest.raises(ValueError, match="corrupt JSON file"):
        read_json(tmp_path / "m.json")
    with pytest.raises(FileNotFoundError, match="no parquet shards"):
        read_shards(tmp_path / "empty")


def test_leftover_of_a_killed_writer_is_removed(tmp_path):
    final = tmp_path / "dataset"
    dead = _dead_pid()
    stale = tmp_path / f".dataset.tmp-{dead}"
    stale.mkdir()
    (stale / "half.arrow").write_text("half")
    with atomic_dir(final) as tmp:
        mark_done(tmp, seconds=0)
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset"]


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid
