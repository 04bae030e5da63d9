"""The M-step: prompt masking, the LR schedule, and that training changes and improves the model."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from factory.config import TrainerConfig
from factory.rundir import read_json
from train.data import (
    IGNORE_INDEX,
    CyclingSampler,
    PromptCompletionDataModule,
    collate,
    tokenize_example,
    tokenize_pairs,
)
from train.finetune import fine_tune
from train.module import warmup_linear_decay


def test_prompt_tokens_are_masked(tiny_model_and_tokenizer):
    _, tok = tiny_model_and_tokenizer
    ex = tokenize_example(tok, "Q: 1+2?\nA: ", "1+2=3. Answer: 3", max_length=512)
    n_prompt = len(tok("Q: 1+2?\nA: ").input_ids)
    assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    assert ex["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(ex["input_ids"][n_prompt:-1]) == "1+2=3. Answer: 3"


def test_collate_pads_right_and_masks_padding(tiny_model_and_tokenizer):
    _, tok = tiny_model_and_tokenizer
    batch = collate(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [5]}],
        pad_token_id=tok.pad_token_id,
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, tok.pad_token_id, tok.pad_token_id]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_cycling_sampler_covers_every_item_each_pass():
    indices = list(CyclingSampler(5, total=12, seed=3))
    assert len(indices) == 12
    assert sorted(indices[:5]) == list(range(5)) and sorted(indices[5:10]) == list(range(5))
    assert indices == list(CyclingSampler(5, total=12, seed=3))


def test_schedule_warms_up_then_decays():
    f = lambda s: warmup_linear_decay(s, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1)
    assert f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55)
    assert f(110) == pytest.approx(0.1)
    assert f(500) == pytest.approx(0.1)


def test_empty_dataset_is_refused(tiny_model_and_tokenizer):
    _, tok = tiny_model_and_tokenizer
    with pytest.raises(ValueError, match="empty dataset"):
        tokenize_pairs(tok, [], max_length=512)
    with pytest.raises(ValueError, match="empty dataset"):
        PromptCompletionDataModule([], pad_token_id=tok.pad_token_id, batch_size=2, max_steps=1)


def test_fine_tune_learns_and_exports(tmp_path, tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    model = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pairs = [
        {"prompt": f"Q: {a}+{b}\nA: ", "completion": f"{a}+{b}={a + b}. Answer: {a + b}"}
        for a in range(1, 6)
        for b in range(1, 6)
    ]
    settings = OmegaConf.merge(
        OmegaConf.structured(TrainerConfig),
        {"max_steps": 60, "batch_size": 8, "lr": 3e-3, "warmup_steps": 5, "progress_bar": False},
    )
    info = fine_tune(model=model, tokenizer=tok, pairs=pairs, out_dir=tmp_path / "model", settings=settings)
    assert info["steps"] == 60
    assert info["last_loss"] < 0.6 * info["first_loss"]
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "training did not change any parameter"
    assert (tmp_path / "model" / "config.json").exists() and (tmp_path / "model" / "stage.json").exists()
    assert read_json(tmp_path / "model" / "stage.json")["steps"] == 60
    assert not list(tmp_path.glob(".model.tmp-*")), "temporary folder left behind"


def test_the_fit_reports_progress_into_a_file(tmp_path, tiny_model_and_tokenizer, capfd, monkeypatch):
    """The M-step's bar writes each step where stdout is a file, not only at the end (Rich's did)."""
    monkeypatch.delenv("TQDM_MINITERS", raising=False)  # Lightning would refresh less often
    model, tok = tiny_model_and_tokenizer
    pairs = [{"prompt": f"Q: {a}+1\nA: ", "completion": f"{a}+1={a + 1}. Answer: {a + 1}"} for a in range(8)]
    settings = OmegaConf.merge(
        OmegaConf.structured(TrainerConfig),
        {"max_steps": 6, "batch_size": 4, "warmup_steps": 1, "progress_bar": True},
    )
    fine_tune(
        model=copy.deepcopy(model), tokenizer=tok, pairs=pairs, out_dir=tmp_path / "m", settings=settings
    )
    out = capfd.readouterr().out
    assert "3/6" in out, f"no intermediate progress in the captured output: {out[-500:]!r}"
