"""``experiment=arith_smollm2`` (ReST-EM on SmolLM2-135M-Instruct), shrunk to a few problems and steps:
killed inside its first M-step, the same command resumes it. Finished stages are kept as they are, the
M-step goes on from its newest checkpoint, and the run ends with every stage and the SFT baseline.

The shrunk run samples with the HF backend (the recipe's vLLM engine would add a start-up per stage; the
resume logic is the loop's, not the sampler's) and trains on the human pairs as well, so the M-step has
data even when the 135M model solves none of the two training problems.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from factory.config import compose
from factory.faults import KILL_ENV
from factory.rundir import RunDir, read_json

ROOT = Path(__file__).resolve().parent.parent


def _overrides(model_dir: Path, tmp: Path) -> list[str]:
    return [
        "experiment=arith_smollm2",
        f"model.name_or_path={model_dir}",
        f"paths.run_dir={tmp / 'run'}",
        f"paths.cache_dir={tmp / 'cache'}",
        "sampler=hf",
        "task.num_human=2",
        "task.num_train=2",
        "task.num_validation=2",
        "task.num_test=2",
        "sampler.num_samples=2",
        "sampler.max_new_tokens=24",
        "eval.num_samples=2",
        "eval.ks=[1,2]",
        "eval.max_new_tokens=24",
        "trainer.epochs=null",
        "trainer.max_steps=4",
        "trainer.warmup_steps=0",
        "trainer.batch_size=2",
        "trainer.checkpoint_every_n_steps=2",
        "trainer.progress_bar=false",
        "loop.iterations=1",
        "loop.include_human_data=true",
    ]


def _restem(overrides: list[str], kill_at: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != KILL_ENV}
    if kill_at:
        env[KILL_ENV] = kill_at
    return subprocess.run(
        [sys.executable, "-c", "from factory.loop import main; main()", *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_the_recipe_composes_for_a_real_model():
    cfg = compose(["experiment=arith_smollm2"])
    assert cfg.model.name == "smollm2_135m_instruct" and cfg.task.prompt_style == "chat"
    assert cfg.sampler.backend == "vllm" and cfg.task.num_test >= 300
    assert cfg.trainer.lr <= 5e-5 and cfg.loop.sft_baseline


@pytest.mark.slow
def test_an_interrupted_run_resumes(smollm2_dir, tmp_path):
    overrides = _overrides(smollm2_dir, tmp_path)
    run = RunDir(compose(overrides).paths.run_dir)

    killed = _restem(overrides, "train.step@3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert run.is_done(0, "eval") and run.is_done(1, "dataset") and not run.is_done(1, "model")
    before = {s: (run.stage(1, s) / "stage.json").read_text() for s in ("samples", "verdicts", "dataset")}
    base_eval = (run.stage(0, "eval") / "stage.json").read_text()

    resumed = _restem(overrides, None)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Finished stages were kept, not redone; the M-step went on from its step-2 checkpoint.
    assert {s: (run.stage(1, s) / "stage.json").read_text() for s in before} == before
    assert (run.stage(0, "eval") / "stage.json").read_text() == base_eval
    model = read_json(run.stage(1, "model") / "stage.json")
    assert model["resumed_from_step"] == 2
    assert run.is_done(1, "eval") and run.is_done("sft_human", "eval")
    rows = json.loads(run.summary.read_text())
    assert [r["iteration"] for r in rows] == [0, 1, "sft_human"]
