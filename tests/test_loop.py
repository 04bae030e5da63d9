"""The whole loop on a shrunken config: every artifact, the summary contract, and resume-by-skipping."""

from __future__ import annotations

import json

import pytest
from datasets import load_from_disk

import factory.loop as loop
from factory.base_model import ensure_base_model
from factory.rundir import RunDir


@pytest.mark.slow
def test_loop_end_to_end_and_rerun_skips(make_cfg, easy_arith, monkeypatch, capsys):
    cfg = make_cfg("loop.iterations=2", *easy_arith)
    rows = loop.run(cfg)
    assert [r["iteration"] for r in rows] == [0, 1, 2, "sft_human"]
    assert all(r["num_kept"] > 0 for r in rows[1:3])
    run_dir = RunDir(cfg.paths.run_dir)
    summary = json.loads(run_dir.summary.read_text())
    assert [r["iteration"] for r in summary][0] == 0 and summary[-1]["iteration"] == "sft_human"
    for row in summary:
        assert set(row) >= {
            "iteration",
            "greedy_accuracy",
            "pass_at_k",
            "maj_at_k",
            "num_problems_solved",
            "num_kept",
            "share_kept_with_valid_steps",
            "timings",
        }
        assert 0.0 <= row["greedy_accuracy"] <= 1.0
        assert set(row["pass_at_k"]) == {"1", "2", "4"}
    report = (run_dir.root / "report.md").read_text()
    assert report.count("|") > 20
    assert "## Verifier audit" in report and "### Examples, iteration 2" in report
    assert "## Greedy gains with standard errors" in report and "| iteration 2 |" in report
    assert (run_dir.root / "plots" / "summary.png").read_bytes()[:4] == b"\x89PNG"
    assert not (run_dir.root / "tracking").exists()  # logger=none (the default) writes no tracking folder
    assert "| iteration |" in capsys.readouterr().out
    for k in [r["iteration"] for r in summary if isinstance(r["iteration"], int) and r["iteration"] > 0]:
        for stage in ("samples", "verdicts", "dataset", "model", "eval"):
            assert run_dir.is_done(k, stage), f"iter_{k}/{stage} not finished"
        ds = load_from_disk(str(run_dir.stage(k, "dataset")))["train"]
        assert len(ds) == summary[k]["num_kept"]
        # Every M-step starts from the base model, never from the previous policy.
        assert run_dir.stage_info(k, "model")["base_model"] == str(ensure_base_model(cfg))
    assert run_dir.is_done(0, "eval") and run_dir.is_done("sft_human", "eval")

    # Rerunning the same command trains, samples and evaluates nothing again.
    def boom(*args, **kwargs):
        raise AssertionError("a finished stage was run again")

    for name in ("e_step", "verify_samples", "snapshot_stage", "train_from_base", "evaluate_model"):
        monkeypatch.setattr(loop, name, boom)
    assert loop.run(cfg) == rows


@pytest.mark.slow
def test_empty_snapshot_stops_without_training(make_cfg, capsys):
    # 5 pretraining steps: the model writes no parseable answer, so iteration 1 keeps nothing.
    cfg = make_cfg(
        "loop.iterations=2",
        "model.pretrain.max_steps=5",
        "sampler.max_new_tokens=8",
        "eval.max_new_tokens=8",
        "loop.sft_baseline=false",
    )
    rows = loop.run(cfg)
    assert [r["iteration"] for r in rows] == [0]
    assert "kept 0 of 160 samples" in capsys.readouterr().out
    run_dir = RunDir(cfg.paths.run_dir)
    assert run_dir.is_done(1, "dataset") and not run_dir.stage(1, "model").exists()
    assert not run_dir.stage(2, "samples").exists()

    # Going on is a config choice: iteration 2 samples again with the same (base) policy.
    cfg.loop.stop_on_empty_snapshot = False
    assert [r["iteration"] for r in loop.run(cfg)] == [0]
    assert run_dir.is_done(2, "dataset") and not run_dir.stage(2, "model").exists()
    manifest = json.loads((run_dir.stage(2, "dataset") / "manifest.json").read_text())
    assert manifest["policy"] == str(ensure_base_model(cfg))


@pytest.mark.slow
def test_empty_snapshot_with_human_data_still_trains(make_cfg):
    # As restem-train does: with loop.include_human_data the M-step has the human pairs to train on.
    cfg = make_cfg(
        "loop.iterations=1",
        "model.pretrain.max_steps=5",
        "sampler.max_new_tokens=8",
        "eval.max_new_tokens=8",
        "loop.sft_baseline=false",
        "loop.include_human_data=true",
    )
    rows = loop.run(cfg)
    run_dir = RunDir(cfg.paths.run_dir)
    assert json.loads((run_dir.stage(1, "dataset") / "manifest.json").read_text())["num_kept"] == 0
    assert [r["iteration"] for r in rows] == [0, 1] and run_dir.is_done(1, "model")
    assert run_dir.stage_info(1, "model")["num_pairs"] == cfg.task.num_human
