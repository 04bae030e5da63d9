"""Experiment tracking (logger=tensorboard): what a run writes is read back from the event files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hydra.errors import MissingConfigException

import factory.loop as loop
from factory.config import compose
from factory.tracking import log_row, make_logger, read_scalars


@pytest.mark.slow
def test_a_tracked_run_writes_m_step_e_step_and_eval_metrics(make_cfg, easy_arith):
    # A global batch of 8 from micro-batches of 4: the tracked loss is each optimizer step's, not a
    # micro-batch's.
    overrides = ["loop.iterations=1", "trainer.global_batch_size=8", *easy_arith]
    cfg = make_cfg(*overrides, "logger=tensorboard", "logger.every_n_steps=5")
    rows = loop.run(cfg)
    run = Path(cfg.paths.run_dir)
    tracking = run / "tracking"
    assert Path(cfg.logger.save_dir) == tracking

    def check_iterations():
        per_iteration = read_scalars(tracking / "iterations")
        assert per_iteration["eval/greedy_accuracy"] == [
            (0, pytest.approx(rows[0]["greedy_accuracy"])),
            (1, pytest.approx(rows[1]["greedy_accuracy"])),
        ]
        assert per_iteration["eval/pass@4"][-1] == (1, pytest.approx(rows[1]["pass_at_k"]["4"]))
        assert per_iteration["e_step/kept"] == [(1, rows[1]["num_kept"])]
        assert per_iteration["e_step/problems_solved"] == [(1, rows[1]["num_problems_solved"])]
        manifest = json.loads((run / "iter_1" / "dataset" / "manifest.json").read_text())
        assert per_iteration["e_step/status/correct"] == [(1, manifest["status_counts"]["correct"])]
        assert {"seconds/samples", "seconds/model", "seconds/eval"} <= set(per_iteration)
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        text = EventAccumulator(str(tracking / "iterations"))
        text.Reload()
        versions = text.Tensors("snapshot/version/text_summary")
        assert [e.step for e in versions] == [1]
        assert versions[0].tensor_proto.string_val[0].decode() == manifest["name"]
        assert read_scalars(tracking / "baseline")["eval/greedy_accuracy"] == [
            (0, pytest.approx(rows[-1]["greedy_accuracy"]))
        ]

    check_iterations()
    for fit, model in (("m_step_1", "iter_1/model"), ("sft_human", "sft_human/model")):
        curves = read_scalars(tracking / fit)
        losses = json.loads((run / model / "train_log.json").read_text())["losses"]
        assert len(losses) == 20
        assert curves["train_loss"] == [(s, pytest.approx(losses[s], abs=1e-4)) for s in (4, 9, 14, 19)], fit
        assert all(value > 0 for _, value in curves["tokens_per_s"]), fit
        assert any(tag.startswith("lr-AdamW") for tag in curves), sorted(curves)

    # A rerun writes the per-iteration series again from the finished stages: each value once.
    assert loop.run(cfg) == rows
    check_iterations()
    # The logger is in no stage's inputs: the same run without it reuses every finished stage.
    assert loop.run(make_cfg(*overrides)) == rows


def test_no_logger_writes_nothing(tmp_path):
    cfg = compose([f"paths.run_dir={tmp_path / 'run'}", "name=t"])
    assert cfg.logger.kind == "none" and make_logger(None) is None
    log_row(cfg.logger, {"iteration": 0, "greedy_accuracy": 0.5})
    assert not (tmp_path / "run").exists()


def test_an_unknown_logger_is_one_config_error(tmp_path):
    with pytest.raises(ValueError, match=r"logger.kind='mlflow'; allowed: none, tensorboard"):
        compose([f"paths.run_dir={tmp_path}", "name=t", "logger.kind=mlflow"])
    with pytest.raises(MissingConfigException, match=r"Could not find 'logger/wandb'"):
        compose([f"paths.run_dir={tmp_path}", "name=t", "logger=wandb"])
    with pytest.raises(ValueError, match=r"logger.every_n_steps must be >= 1"):
        compose([f"paths.run_dir={tmp_path}", "name=t", "logger=tensorboard", "logger.every_n_steps=0"])


def test_tensorboard_missing_is_one_config_error_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed
    with pytest.raises(ValueError, match=r"logger=tensorboard needs .* pip install -e '\.\[tracking\]'"):
        compose([f"paths.run_dir={tmp_path}", "name=t", "logger=tensorboard"])
    tracking = {"kind": "tensorboard", "save_dir": str(tmp_path), "name": "x", "every_n_steps": 1}
    with pytest.raises(ValueError, match=r"pip install -e '\.\[tracking\]'"):
        make_logger(tracking)
