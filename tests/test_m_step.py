"""The M-step on real checkpoints: fp32 master weights, sequence length, one BOS and the right end token,
LoRA merged on export, the epoch budget (train/finetune.py, train/data.py, train/m_step.py)."""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf
from test_tokens import _chat_tokenizer
from transformers import AutoModelForCausalLM

from factory.base_model import base_model_key, pretrain_settings
from factory.config import TrainerConfig, check_trainer, compose
from factory.rundir import read_json
from train import finetune, m_step
from train.data import IGNORE_INDEX, num_loss_tokens, num_steps, tokenize_example, tokenize_pairs
from train.finetune import fine_tune


def _pairs(n=40, prefix=""):
    return [
        {"prompt": f"{prefix}Q: {a}+{b}\nA: ", "completion": f"{a}+{b}={a + b}. Answer: {a + b}"}
        for a in range(1, 9)
        for b in range(1, 6)
    ][:n]


def _settings(**overrides):
    base = {"max_steps": 4, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "progress_bar": False}
    return OmegaConf.merge(OmegaConf.structured(TrainerConfig), {**base, **overrides})


class _Probe(Callback):
    """Records what the optimizer steps: parameter dtypes and the trainable weights at start and end."""

    def on_train_start(self, trainer, pl_module):
        groups = trainer.optimizers[0].param_groups
        self.optimizer_dtypes = {p.dtype for g in groups for p in g["params"]}
        self.num_optimized = sum(len(g["params"]) for g in groups)
        self.start = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        self.trainable = {n for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_train_end(self, trainer, pl_module):
        self.end = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


# --- tokenization: one BOS, the right end token, prompts cut from the left, completions never ---


def test_a_long_prompt_loses_its_start_not_its_completion(tiny_model_and_tokenizer):
    _, tok = tiny_model_and_tokenizer
    prompt, completion = "x" * 50 + "Q: 1+2?\nA: ", "1+2=3. Answer: 3"
    ex = tokenize_example(tok, prompt, completion, max_length=30)
    n_completion = len(completion) + 1  # one token per character, plus the EOS
    assert len(ex["input_ids"]) == 30 and ex["prompt_truncated"]
    assert ex["input_ids"][0] == tok.bos_token_id  # the BOS survives the cut
    assert (
        tok.decode(ex["input_ids"][1:-n_completion])
        == ("x" * 50 + "Q: 1+2?\nA: ")[-(30 - 1 - n_completion) :]
    )
    assert (
        tok.decode(ex["input_ids"][-n_completion:-1]) == completion
        and ex["input_ids"][-1] == tok.eos_token_id
    )
    assert ex["labels"][:-n_completion] == [IGNORE_INDEX] * (30 - n_completion)
    assert ex["labels"][-n_completion:] == ex["input_ids"][-n_completion:]
    assert not tokenize_example(tok, prompt, completion, max_length=512)["prompt_truncated"]


def test_pairs_that_cannot_be_trained_on_are_dropped_and_counted(tiny_model_and_tokenizer):
    _, tok = tiny_model_and_tokenizer
    pairs = _pairs(4) + [
        {"prompt": "x" * 40 + "Q: 1+1\nA: ", "completion": "Answer: 2"},  # prompt cut, kept
        {"prompt": "Q: 9+9\nA: ", "completion": "9" * 40},  # the completion alone does not fit: dropped
        {"prompt": "", "completion": ""},  # nothing but an end token with no prompt: no loss token
    ]
    plain = train_char_tokenizer_without_bos()
    examples, stats = tokenize_pairs(tok, pairs[:-1], max_length=32)
    assert stats == {
        "num_pairs": 6,
        "num_prompts_truncated": 1,
        "num_dropped_too_long": 1,
        "num_dropped_no_loss_tokens": 0,
        "num_examples": 5,
    }
    assert all(num_loss_tokens(e) > 0 and len(e["input_ids"]) <= 32 for e in examples)
    assert set(examples[0]) == {"input_ids", "labels"}
    _, stats = tokenize_pairs(plain, pairs[-1:] + pairs[:1], max_length=32)
    assert stats["num_dropped_no_loss_tokens"] == 1 and stats["num_examples"] == 1
    with pytest.raises(ValueError, match=r"max_seq_len=8 .*raise trainer\.max_seq_len"):
        tokenize_pairs(tok, _pairs(4), max_length=8)


def train_char_tokenizer_without_bos():
    """A character tokenizer that adds no BOS (as SmolLM2's and Qwen's add none)."""
    from tokenizers import processors

    from factory.models import train_char_tokenizer

    tok = train_char_tokenizer(["Q: 1+1\nA: Answer: 2"])
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    assert tok("ab").input_ids[0] != tok.bos_token_id
    return tok


def test_chat_prompts_get_one_bos_and_end_with_the_turn_token():
    tok = _chat_tokenizer()
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "1+2?"}], tokenize=False, add_generation_prompt=True
    )
    eot = tok.convert_tokens_to_ids("<|eot|>")
    (chat_example, plain_example), _ = tokenize_pairs(
        tok,
        [{"prompt": chat, "completion": "Answer: 3"}, {"prompt": "Q: 1+2?\nA: ", "completion": "Answer: 3"}],
        max_length=512,
    )
    assert (
        chat_example["input_ids"].count(tok.bos_token_id) == 1
        and chat_example["input_ids"][0] == tok.bos_token_id
    )
    assert chat_example["input_ids"][-1] == eot and chat_example["labels"][-1] == eot
    assert (
        plain_example["input_ids"][0] == tok.bos_token_id
        and plain_example["input_ids"][-1] == tok.eos_token_id
    )
    # A cut chat prompt keeps its BOS too.
    long_chat = tok.apply_chat_template(
        [{"role": "user", "content": "x" * 100 + "1+2?"}], tokenize=False, add_generation_prompt=True
    )
    cut = tokenize_example(tok, long_chat, "Answer: 3", max_length=40, end_id=eot)
    assert cut["prompt_truncated"] and cut["input_ids"].count(tok.bos_token_id) == 1
    assert cut["input_ids"][0] == tok.bos_token_id and len(cut["input_ids"]) == 40


def test_long_prompts_train_with_a_finite_loss(tmp_path, tiny_model_and_tokenizer, caplog):
    """The test model has 256 positions: 600-character prompts used to be cut at 512 tokens from the right,
    leaving no completion token and a NaN loss."""
    model, tok = tiny_model_and_tokenizer
    model = copy.deepcopy(model)
    pairs = _pairs(8, prefix="x" * 600)
    with caplog.at_level(logging.WARNING, logger="train.finetune"):
        info = fine_tune(
            model=model, tokenizer=tok, pairs=pairs, out_dir=tmp_path / "m", settings=_settings()
        )
    assert math.isfinite(info["first_loss"]) and math.isfinite(info["last_loss"])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert info["max_seq_len"] == 256  # trainer.max_seq_len 2048, capped by the model's positions
    stage = read_json(tmp_path / "m" / "stage.json")
    assert stage["num_prompts_truncated"] == 8 and stage["num_examples"] == 8
    assert stage["num_dropped_too_long"] == stage["num_dropped_no_loss_tokens"] == 0
    warnings = [r.getMessage() for r in caplog.records if "max_seq_len" in r.getMessage()]
    assert len(warnings) == 1 and "8 of 8 prompts cut from the left" in warnings[0]


# --- fp32 master weights ---


def test_a_bf16_model_trains_fp32_master_weights_and_exports_bf16(
    tmp_path, make_cfg, monkeypatch, tiny_model_and_tokenizer
):
    model, tok = tiny_model_and_tokenizer
    base = tmp_path / "base"
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(base)
    tok.save_pretrained(base)
    cfg = make_cfg(
        "model.dtype=bfloat16",
        "trainer.lr=1e-6",
        "trainer.max_steps=1",
        "trainer.warmup_steps=0",
        "trainer.checkpoint_every_n_steps=0",
    )
    probe = _Probe()
    monkeypatch.setattr(
        m_step, "fine_tune_base", functools.partial(finetune.fine_tune_base, callbacks=[probe])
    )
    m_step.train_from_base(cfg, base_path=base, pairs=_pairs(8), out_dir=tmp_path / "m", desc="t")
    assert probe.optimizer_dtypes == {torch.float32}
    weights = [n for n in probe.trainable if probe.start[n].ndim == 2]
    changed = sum((probe.start[n] != probe.end[n]).sum().item() for n in weights)
    total = sum(probe.start[n].numel() for n in weights)
    # One AdamW step moves each weight by ~lr = 1e-6: kept in fp32, ...
    assert changed > 0.9 * total
    # ... while bf16 (8 bits of mantissa) rounds the same step away everywhere but near zero.
    rounded = [(probe.start[n].bfloat16() + 1e-6 != probe.start[n].bfloat16()).sum().item() for n in weights]
    assert sum(rounded) < 0.1 * total
    # The export is in model.dtype, what sampling loads.
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype="auto").dtype == torch.bfloat16


def test_low_precision_weights_are_refused_by_config():
    with pytest.raises(ValueError, match="trainer.precision=bf16-true .* use bf16-mixed"):
        check_trainer(_settings(precision="bf16-true"))
    with pytest.raises(ValueError, match="trainer.lora.r > 0 with trainer.strategy=fsdp"):
        check_trainer(_settings(strategy="fsdp", lora={"r": 8}))
    with pytest.raises(ValueError, match="trainer.epochs must be > 0"):
        compose(["trainer.epochs=0"])
    cfg = compose(["trainer.lora.r=8", "trainer.lora.target_modules=[q_proj,v_proj]", "trainer.epochs=1.5"])
    assert cfg.trainer.lora.r == 8 and cfg.trainer.epochs == 1.5
    # The tiny demo model has no positions beyond its own; a real model's recipe keeps the long default.
    assert cfg.trainer.max_seq_len == cfg.model.tiny.max_position_embeddings == 512
    assert compose(["model=smollm2_135m_instruct", "task=gsm8k"]).trainer.max_seq_len >= 2048


# --- the epoch budget ---


def test_epochs_size_the_budget_after_dropping_pairs(tmp_path, tiny_model_and_tokenizer, caplog):
    assert num_steps(max_steps=600, epochs=None, num_examples=40, global_batch_size=4) == 600
    assert num_steps(max_steps=600, epochs=1.5, num_examples=41, global_batch_size=4) == 16  # ceil(15.375)
    assert num_steps(max_steps=10, epochs=2, num_examples=40, global_batch_size=4) == 10
    model, tok = tiny_model_and_tokenizer
    too_long = [{"prompt": "Q: 1+1\nA: ", "completion": "2" * 300}] * 8  # dropped: 40 examples are left
    info = fine_tune(
        model=copy.deepcopy(model),
        tokenizer=tok,
        pairs=_pairs(40) + too_long,
        out_dir=tmp_path / "m",
        settings=_settings(epochs=0.5, max_steps=600),
    )
    stage = read_json(tmp_path / "m" / "stage.json")
    assert info["steps"] == stage["steps"] == 5 and stage["epochs"] == 0.5  # ceil(0.5 x 40 / 4)
    assert stage["num_dropped_too_long"] == 8 and stage["num_pairs"] == 48
    with caplog.at_level(logging.WARNING, logger="train.finetune"):
        capped = fine_tune(
            model=copy.deepcopy(model),
            tokenizer=tok,
            pairs=_pairs(40),
            out_dir=tmp_path / "c",
            settings=_settings(epochs=2, max_steps=3),
        )
    assert capped["steps"] == 3 and capped["epochs"] == 0.3
    assert any("needs more than trainer.max_steps=3" in r.getMessage() for r in caplog.records)


# --- LoRA ---


def test_lora_trains_adapters_only_and_exports_a_plain_merged_model(tmp_path, tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    trained = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = _Probe()
    info = fine_tune(
        model=trained,
        tokenizer=tok,
        pairs=_pairs(),
        out_dir=tmp_path / "m",
        settings=_settings(lora={"r": 4, "alpha": 8}),
        callbacks=[probe],
    )
    assert info["lora_r"] == 4
    assert probe.trainable and all("lora_" in n for n in probe.trainable)
    assert probe.num_optimized == len(probe.trainable)
    # The base weights stay frozen during the fit; the adapters move.
    for name in set(probe.start) - probe.trainable:
        assert torch.equal(probe.start[name], probe.end[name]), name
    assert any(not torch.equal(probe.start[n], probe.end[n]) for n in probe.trainable)
    # The folder is a plain transformers model (what vLLM loads), the adapters merged into its weights.
    out = tmp_path / "m"
    assert not list(out.glob("adapter_*"))
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert set(loaded) == set(before)
    merged = [k for k in before if not torch.equal(loaded[k], before[k])]
    assert merged and all(k.endswith("proj.weight") for k in merged)
    assert torch.equal(loaded["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    # Nothing of peft is left on the trained model: a later fit of it starts from plain modules.
    assert not any("lora" in name for name, _ in trained.named_modules())
    again = fine_tune(
        model=trained,
        tokenizer=tok,
        pairs=_pairs(),
        out_dir=tmp_path / "again",
        settings=_settings(lora={"r": 4, "alpha": 8}, max_steps=1),
    )
    assert again["steps"] == 1


def test_m_step_settings_do_not_touch_base_pretraining(make_cfg):
    plain = make_cfg()
    lora = make_cfg("trainer.lora.r=8", "trainer.lora.alpha=16", "trainer.epochs=2")
    assert base_model_key(lora) == base_model_key(plain)
    assert pretrain_settings(lora).lora.r == 0 and pretrain_settings(lora).epochs is None


SMOLLM2 = Path("/work/models/SmolLM2-135M-Instruct")


@pytest.mark.skipif(not SMOLLM2.is_dir(), reason=f"the offline SmolLM2 checkpoint is not at {SMOLLM2}")
def test_smollm2_chat_pairs_keep_their_turn_start_and_end_with_im_end():
    """The real tokenizer: ChatML, no BOS of its own, ``<|im_start|>`` as its BOS token, ``<|im_end|>``."""
    from factory.models import load_tokenizer

    tok = load_tokenizer(SMOLLM2)
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Ann has 3 pens and buys 4 more. " * 40 + "How many?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    (example,), stats = tokenize_pairs(tok, [{"prompt": chat, "completion": "3+4=7. #### 7"}], max_length=128)
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert stats["num_prompts_truncated"] == 1 and len(example["input_ids"]) == 128
    assert example["input_ids"][0] == im_start and example["input_ids"][-1] == im_end
    assert tok.decode(example["input_ids"][-20:]).endswith("assistant\n3+4=7. #### 7<|im_end|>")


def test_lora_with_chunked_loss_and_gradient_checkpointing_trains_the_same(
    tmp_path, tiny_model_and_tokenizer
):
    """The chunked loss and activation checkpointing call the transformers model inside peft's wrapper."""
    model, tok = tiny_model_and_tokenizer
    trained = {}
    for name, extra in {
        "plain": {},
        "chunked": {"loss_chunk_size": 16, "gradient_checkpointing": True},
    }.items():
        trained[name] = copy.deepcopy(model)
        fine_tune(
            model=trained[name],
            tokenizer=tok,
            pairs=_pairs(),
            out_dir=tmp_path / name,
            settings=_settings(lora={"r": 4}, **extra),
        )
    for (name, a), b in zip(
        trained["plain"].state_dict().items(), trained["chunked"].state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    assert not torch.equal(
        trained["plain"].state_dict()["model.layers.0.mlp.up_proj.weight"],
        model.state_dict()["model.layers.0.mlp.up_proj.weight"],
    )
