"""The ddp and fsdp trainer configs: two CPU processes (gloo) train like one process on the same batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dist_job  # tests/ is on sys.path under pytest's default import mode
import pytest
import torch
from transformers import AutoModelForCausalLM

from factory.config import compose
from factory.rundir import read_json
from train.finetune import fine_tune


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The reference: the same settings on one process (accumulation instead of a second rank)."""
    cfg = compose(
        ["paths.run_dir=unused", "trainer=ddp", *dist_job.CPU, "trainer.devices=1", "trainer.strategy=auto"]
    )
    model, tokenizer = dist_job.tiny_model()
    out = tmp_path_factory.mktemp("single") / "m"
    fine_tune(model=model, tokenizer=tokenizer, pairs=dist_job.PAIRS, out_dir=out, settings=cfg.trainer)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["ddp", "fsdp"])
def test_multi_process_config_trains_like_one_process(tmp_path, single_process, trainer):
    out = tmp_path / "m"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two ranks on two cores
    job = subprocess.run(
        [
            sys.executable,
            str(Path(dist_job.__file__)),
            str(out),
            trainer,
            "trainer.checkpoint_every_n_steps=4",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert job.returncode == 0, job.stderr[-3000:]
    assert "MEMBER: 2/2" in job.stderr + job.stdout
    info = read_json(out / "stage.json")
    assert info["steps"] == 6
    assert info["first_loss"] == pytest.approx(
        read_json(single_process / "stage.json")["first_loss"], rel=1e-5
    )
    got = AutoModelForCausalLM.from_pretrained(out).state_dict()
    want = AutoModelForCausalLM.from_pretrained(single_process).state_dict()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, atol=1e-5, rtol=1e-4, msg=name)
    assert not (tmp_path / ".m.partial").exists()


@pytest.mark.slow
def test_loop_runs_a_multi_process_m_step_as_its_own_torchrun_job(tmp_path, single_process):
    from train.m_step import train_from_base

    model, tokenizer = dist_job.tiny_model()
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    cfg = compose(["paths.run_dir=unused", "trainer=ddp", *dist_job.CPU])
    info = train_from_base(
        cfg, base_path=tmp_path / "base", pairs=dist_job.PAIRS, out_dir=tmp_path / "m", desc="t"
    )
    assert info["steps"] == 6 and info["base_model"] == str(tmp_path / "base")
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "m").state_dict()
    want = AutoModelForCausalLM.from_pretrained(single_process).state_dict()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, atol=1e-5, rtol=1e-4, msg=name)
    assert not (tmp_path / ".m.launch").exists()


@pytest.mark.slow
def test_lora_under_ddp_trains_like_one_process(tmp_path):
    """DDP skips the frozen base weights; the merged export of rank 0 equals a one-process LoRA fit."""
    lora = ["trainer.lora.r=4", "trainer.checkpoint_every_n_steps=0"]
    cfg = compose(
        [
            "paths.run_dir=unused",
            "trainer=ddp",
            *dist_job.CPU,
            "trainer.devices=1",
            "trainer.strategy=auto",
            *lora,
        ]
    )
    model, tokenizer = dist_job.tiny_model()
    fine_tune(
        model=model, tokenizer=tokenizer, pairs=dist_job.PAIRS, out_dir=tmp_path / "one", settings=cfg.trainer
    )
    job = subprocess.run(
        [sys.executable, str(Path(dist_job.__file__)), str(tmp_path / "two"), "ddp", *lora],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert job.returncode == 0, job.stderr[-3000:]
    assert read_json(tmp_path / "two" / "stage.json")["lora_r"] == 4
    assert not list((tmp_path / "two").glob("adapter_*"))
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "two").state_dict()
    want = AutoModelForCausalLM.from_pretrained(tmp_path / "one").state_dict()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, atol=1e-5, rtol=1e-4, msg=name)
