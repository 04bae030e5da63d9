"""The single-stage commands (``restem-sample``, ``-verify``, ``-snapshot``, ``-train``, ``-eval``)
run one after another over one run directory, as a user would run them by hand."""

from __future__ import annotations

import subprocess
import sys

import polars as pl
import pytest

from eval import evaluate
from factory import base_model, sample, snapshot, verify
from factory.rundir import RunDir, read_json
from train import m_step


@pytest.mark.slow
def test_stage_commands_in_sequence(make_cfg, easy_arith):
    cfg = make_cfg("iteration=1", *easy_arith)
    run_dir = RunDir(cfg.paths.run_dir)
    with pytest.raises(FileNotFoundError, match="run restem-sample first"):
        verify.run(cfg)
    base = base_model.run(cfg)["base_model"]
    assert base_model.run(cfg)["base_model"] == base  # cached: built once
    assert sample.run(cfg)["num_samples"] == 40 * 4
    assert verify.run(cfg)["num_verdicts"] == 160
    verdicts = pl.read_parquet(sorted(run_dir.stage(1, "verdicts").glob("*.parquet")))
    samples = pl.read_parquet(sorted(run_dir.stage(1, "samples").glob("*.parquet")))
    assert verdicts.select(["problem_id", "sample_idx"]).equals(samples.select(["problem_id", "sample_idx"]))
    assert set(verdicts["status"].unique()) <= {"correct", "wrong", "unparseable"}
    manifest = snapshot.run(cfg)
    assert manifest["num_kept"] == read_json(run_dir.stage(1, "dataset") / "manifest.json")["num_kept"]
    assert manifest["policy"] == str(base)
    if manifest["num_kept"]:
        assert m_step.run(cfg)["steps"] == cfg.trainer.max_steps
        metrics = evaluate.run(cfg)
        assert metrics["num_problems"] == cfg.task.num_test
    # Stage commands skip finished work.
    assert "skipped" in sample.run(cfg) and "skipped" in verify.run(cfg) and "skipped" in snapshot.run(cfg)


def test_cli_reports_a_misspelt_key(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from factory.loop import main; main()",
            "sampler.temprature=0.7",
            f"paths.run_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "temprature" in proc.stderr
    assert not any(tmp_path.iterdir()), "a config error must not write anything"


def test_cli_bad_value_is_one_clear_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from factory.loop import main; main()",
            "task.strictness=lenient",
            f"paths.run_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: config error: task.strictness='lenient'; allowed: answer, steps"
