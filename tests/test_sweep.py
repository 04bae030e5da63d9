"""Sweeps: the SLURM launcher config composes, a 2x2 shrunk sweep runs with -m (each point its own run
dir, shared samples reused), and restem-report aggregates every point with difficulty buckets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml
from conftest import EASY_ARITH, SHRINK
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from eval.sweep_report import build_report, difficulty_table, main
from factory.config import CONF_DIR, register_configs


def test_slurm_launcher_config_composes():
    pytest.importorskip(
        "hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher not installed"
    )
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "sampler.num_samples=16"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1 and launcher.timeout_min == 240
    assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == "${hydra.job.num}"  # one run dir per job


def _fake_point(root: Path, num_samples: int, greedy: list[float], base_rates: list[int]) -> None:
    """A finished run dir: config, summary rows, and per-problem results of base, iter_1 and SFT."""
    root.mkdir(parents=True)
    config = {
        "name": "x",
        "paths": {"run_dir": str(root)},
        "sampler": {"num_samples": num_samples, "seed": 0},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [
        {
            "iteration": k,
            "greedy_accuracy": g,
            "pass_at_k": {"1": g, "4": min(1.0, g + 0.2)},
            "maj_at_k": {"4": g},
        }
        for k, g in zip([0, 1, "sft_human"], greedy, strict=True)
    ]
    (root / "summary.json").write_text(json.dumps(rows))
    ids = [f"p{i}" for i in range(len(base_rates))]
    for name, correct in (
        ("iter_0", [r == 4 for r in base_rates]),
        ("iter_1", [True] * len(ids)),
        ("sft_human", [False] * len(ids)),
    ):
        (root / name / "eval").mkdir(parents=True)
        pl.DataFrame(
            {
                "problem_id": ids,
                "greedy_correct": correct,
                "num_samples": [4] * len(ids),
                "num_correct": base_rates,
            }
        ).write_parquet(root / name / "eval" / "per_problem.parquet")


def test_report_labels_points_and_buckets_by_base_solve_rate(tmp_path):
    _fake_point(tmp_path / "sweep" / "0", 4, [0.25, 0.5, 0.3], [0, 1, 2, 4])
    _fake_point(tmp_path / "sweep" / "1", 8, [0.25, 0.75, 0.3], [0, 0, 3, 4])
    table = difficulty_table(tmp_path / "sweep" / "0")
    base = {
        b: (n, a)
        for b, n, a, m in table.select(["bucket", "problems", "greedy_accuracy", "model"]).iter_rows()
        if m == "0"
    }
    assert base == {
        "never (0%)": (1, 0.0),
        "rarely (<50%)": (1, 0.0),
        "often (50-99%)": (1, 0.0),
        "always (100%)": (1, 1.0),
    }
    result = build_report(tmp_path / "sweep")
    assert result["points"] == ["sampler.num_samples=4", "sampler.num_samples=8"]
    text = result["report"].read_text()
    assert "| sampler.num_samples | iteration | greedy | pass@1 | pass@4 | maj@4 | kept |" in text
    assert "| 8 | 1 | 75.0% |" in text and "| 8 | SFT on human data | 30.0% |" in text
    assert "| 8 | 25.0% | 75.0% (1) | 75.0% | 30.0% | +45.0 points |" in text
    assert "| never (0%) (2) | 0.0% | 100.0% | 0.0% |" in text  # point 8: two problems the base never solved
    for png in result["plots"].values():
        assert png.read_bytes()[:4] == b"\x89PNG"


def test_report_command_errors_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert capsys.readouterr().err.startswith("error: no finished run")


@pytest.mark.slow
def test_two_by_two_sweep_runs_every_point_and_reports_it(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [
        str(Path(sys.executable).with_name("restem")),
        "-m",
        *SHRINK,
        *EASY_ARITH,
        "name=sweep_test",
        # Smaller still than the shared shrink: few eval problems and samples, short M-steps.
        "eval.limit=8",
        "eval.num_samples=2",
        "eval.ks=[1,2]",
        "trainer.max_steps=8",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.sweep.dir={sweep}",
        "sampler.num_samples=4,2",
        "loop.iterations=1,2",
    ]
    subprocess.run(cmd, check=True, cwd=tmp_path, env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [j.name for j in jobs] == ["0", "1", "2", "3"]
    for job in jobs:  # each point ran in its own run dir
        cfg = yaml.safe_load((job / "config.yaml").read_text())
        assert cfg["paths"]["run_dir"] == str(job)
        summary = json.loads((job / "summary.json").read_text())
        assert [r["iteration"] for r in summary][-1] == "sft_human"
    # Jobs 1-3 sample iteration 1 with the same base policy as job 0 (K=4): all reuse its samples.
    for job in jobs[1:]:
        info = json.loads((job / "iter_1" / "samples" / "stage.json").read_text())
        assert info.get("cached_from", "").endswith("K00004"), job
    result = build_report(sweep)
    assert len(result["points"]) == 4
    text = result["report"].read_text()
    assert "| loop.iterations | sampler.num_samples | iteration |" in text
    for iterations, k in ((1, 4), (2, 4), (1, 2), (2, 2)):
        assert f"| {iterations} | {k} | {iterations} |" in text  # every point's last iteration
    assert text.count("SFT on human data |") >= 4 and "## Gains by problem difficulty" in text
