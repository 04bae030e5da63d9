"""Selection on validation accuracy (train/selection.py): the tiny base (model.pretrain.select), the M-steps
and the SFT baseline (trainer.select) keep their best scoring weights and stop at a plateau."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from factory import loop
from factory.config import TrainerConfig, validate
from factory.rundir import RunDir, read_json
from train.finetune import fine_tune
from train.selection import BestOnValidation


def test_best_weights_are_kept_and_the_fit_stops_at_the_plateau(tmp_path, tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    model = copy.deepcopy(model)
    scores = iter([0.1, 0.5, 0.3, 0.2, 0.9, 0.9])  # best at the 2nd scoring, then 2 without a new best
    seen = {}

    def score(m) -> float:
        s = next(scores)
        seen[len(seen)] = (s, {k: v.detach().clone() for k, v in m.state_dict().items()})
        return s

    pairs = [{"prompt": f"Q: {i}+1?\nA: ", "completion": f"{i}+1={i + 1}. Answer: {i + 1}"} for i in range(8)]
    settings = OmegaConf.merge(
        OmegaConf.structured(TrainerConfig),
        {"max_steps": 40, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "progress_bar": False},
    )
    callback = BestOnValidation(score, every=5, patience=2)
    info = fine_tune(
        model=model,
        tokenizer=tok,
        pairs=pairs,
        out_dir=tmp_path / "m",
        settings=settings,
        callbacks=[callback],
    )
    # Scored at steps 5, 10 (best), 15 and 20 (two without a new best: stop); step 10's weights exported.
    assert info["selection"]["best_step"] == 10 and info["selection"]["steps_trained"] == 20
    assert [s for s, _ in info["selection"]["history"]] == [5, 10, 15, 20]
    assert read_json(tmp_path / "m" / "stage.json")["selection"]["best_score"] == 0.5
    best = seen[1][1]
    assert all(torch.equal(v, best[k]) for k, v in model.state_dict().items())


def test_no_scoring_before_min_steps(tmp_path, tiny_model_and_tokenizer):
    """An early lucky peak cannot be picked or stop the fit: steps before min_steps are not scored."""
    model, tok = tiny_model_and_tokenizer
    scores = iter([0.2, 0.1, 0.15, 0.12])
    pairs = [{"prompt": f"Q: {i}+1?\nA: ", "completion": f"{i}+1={i + 1}. Answer: {i + 1}"} for i in range(8)]
    settings = OmegaConf.merge(
        OmegaConf.structured(TrainerConfig),
        {"max_steps": 30, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "progress_bar": False},
    )
    callback = BestOnValidation(lambda m: next(scores), every=5, patience=2, min_steps=15)
    info = fine_tune(
        model=copy.deepcopy(model), tokenizer=tok, pairs=pairs, out_dir=tmp_path / "m", settings=settings,
        callbacks=[callback],
    )  # fmt: skip
    assert [s for s, _ in info["selection"]["history"]] == [15, 20, 25]  # 15 best, then 2 without: stop
    assert info["selection"]["best_step"] == 15 and info["selection"]["steps_trained"] == 25


def test_m_step_and_sft_select_on_validation(make_cfg, easy_arith):
    cfg = make_cfg(
        *easy_arith,
        "loop.iterations=1",
        "trainer.max_steps=12",
        "trainer.select.every=4",
        "trainer.select.patience=5",
        "trainer.select.num_problems=5",
    )
    loop.run(cfg)
    run_dir = RunDir(cfg.paths.run_dir)
    for k in (1, "sft_human"):
        selection = run_dir.stage_info(k, "model")["selection"]
        assert [s for s, _ in selection["history"]] == [4, 8, 12]
        assert selection["best_score"] == max(v for _, v in selection["history"])
    # The base's own selection is model.pretrain.select: trainer.select never changes the cached base.
    assert len(list(Path(cfg.paths.cache_dir).glob("base_models/*"))) == 1


def test_selection_settings_are_checked(make_cfg):
    from factory.config import check_select_in_one_process

    one_process = "trainer.select.every > 0 scores the model in the training process"
    for trainer in ("trainer.devices=2", "trainer=ddp", "trainer=fsdp"):
        cfg = make_cfg("trainer.select.every=5", trainer)
        validate(cfg)  # composes (e.g. --cfg job); the fit refuses when it starts
        with pytest.raises(ValueError, match=one_process):
            check_select_in_one_process(cfg.trainer)
    check_select_in_one_process(make_cfg("trainer.select.every=5").trainer)
    with pytest.raises(ValueError, match="trainer.select.every must be >= 0"):
        validate(make_cfg("trainer.select.every=-1"))
    with pytest.raises(ValueError, match="trainer.select.patience must be >= 1, got 0"):
        validate(make_cfg("trainer.select.every=5", "trainer.select.patience=0"))
    with pytest.raises(ValueError, match="model.pretrain.select.num_problems must be >= 1, got 0"):
        validate(make_cfg("model.pretrain.select.every=5", "model.pretrain.select.num_problems=0"))
    with pytest.raises(ValueError, match="model.pretrain.select.every must be >= 0"):
        validate(make_cfg("model.pretrain.select.every=-3"))
    for key in ("model.pretrain.select.min_steps", "trainer.select.min_steps"):
        with pytest.raises(ValueError, match=f"{key} must be >= 0, got -1"):
            validate(make_cfg(f"{key}=-1"))


def test_what_m_step_selection_scores_with_is_an_input_of_the_model_stage(make_cfg, monkeypatch):
    import factory.stage_inputs as si

    monkeypatch.setattr(si, "weights_fingerprint", lambda path: "w")  # no base model needed
    pairs = [{"prompt": "Q: 1+1?\nA: ", "completion": "1+1=2. Answer: 2"}]

    def model_inputs(*overrides):
        with si.stage_inputs(make_cfg(*overrides)) as stages:
            stages.base = "base"
            return stages.model(1, pairs)

    on = "trainer.select.every=5"
    assert model_inputs(on) != model_inputs(on, "eval.max_new_tokens=30")
    assert model_inputs(on) != model_inputs(on, "task.num_validation=12")
    assert model_inputs() == model_inputs("eval.max_new_tokens=30")  # selection off: eval keys do not count
