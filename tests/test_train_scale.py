"""The M-step at scale: packing, the chunked loss, global batches over ranks and accumulation, resuming."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from factory.config import TrainerConfig
from train.data import (
    PromptCompletionDataModule,
    StepBatchSampler,
    collate,
    collate_packed,
    num_loss_tokens,
    tokenize_example,
    tokenize_pairs,
)
from train.finetune import fine_tune
from train.loss import causal_lm_loss_sum

PROMPTS = ["Q: 1+2?\nA: ", "Q: Ann has 3 pens and 4 more.\nA: ", "Q: 5?\nA: "]
COMPLETIONS = ["1+2=3. Answer: 3", "3+4=7. Answer: 7", "Answer: 5"]


def _examples(tok):
    return [tokenize_example(tok, p, c, max_length=512) for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]


def _pairs(n=40):
    return [
        {"prompt": f"Q: {a}+{b}\nA: ", "completion": f"{a}+{b}={a + b}. Answer: {a + b}"}
        for a in range(1, 9)
        for b in range(1, 6)
    ][:n]


def _settings(**overrides):
    base = {"max_steps": 12, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "progress_bar": False}
    return OmegaConf.merge(OmegaConf.structured(TrainerConfig), {**base, **overrides})


def _train(model, tok, tmp_path, name, **overrides):
    model = copy.deepcopy(model)
    info = fine_tune(
        model=model, tokenizer=tok, pairs=_pairs(), out_dir=tmp_path / name, settings=_settings(**overrides)
    )
    return model, info


def _assert_same_weights(a, b, atol=1e-5):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-4, msg=name)


def test_packed_loss_and_gradients_equal_unpacked(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    model = copy.deepcopy(model).eval()
    examples = _examples(tok)
    padded = collate(examples, pad_token_id=tok.pad_token_id)
    packed = collate_packed(examples)
    assert packed["input_ids"].shape == (1, sum(len(e["input_ids"]) for e in examples))
    assert (packed["labels"] != -100).sum() == sum(num_loss_tokens(e) for e in examples)

    def loss_and_grads(batch):
        model.zero_grad()
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss_padded, grads_padded = loss_and_grads(padded)
    loss_packed, grads_packed = loss_and_grads(packed)
    torch.testing.assert_close(loss_packed, loss_padded, atol=1e-5, rtol=1e-5)
    for g_packed, g_padded in zip(grads_packed, grads_padded, strict=True):
        torch.testing.assert_close(g_packed, g_padded, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_no_attention_across_packed_samples(tiny_model_and_tokenizer, attn):
    model, tok = tiny_model_and_tokenizer
    model = copy.deepcopy(model).eval()
    model.set_attn_implementation(attn)
    examples = _examples(tok)
    changed = [
        {
            **examples[0],
            "input_ids": [examples[0]["input_ids"][0]] + [7] * (len(examples[0]["input_ids"]) - 1),
        }
    ]
    n_first = len(examples[0]["input_ids"])
    with torch.no_grad():
        logits = model(**collate_packed(examples), use_cache=False).logits[0, n_first:]
        logits_changed = model(**collate_packed(changed + examples[1:]), use_cache=False).logits[0, n_first:]
        alone = model(**collate_packed(examples[1:2]), use_cache=False).logits[0]
    assert not torch.equal(
        model(**collate_packed(changed), use_cache=False).logits,
        model(**collate_packed(examples[:1]), use_cache=False).logits,
    )
    torch.testing.assert_close(logits_changed, logits, atol=1e-5, rtol=1e-5)
    # The second sample packed behind the first gives the logits it has on its own.
    torch.testing.assert_close(logits[: len(examples[1]["input_ids"])], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [0, 5])
def test_chunked_loss_equals_model_loss(tiny_model_and_tokenizer, chunk_size):
    model, tok = tiny_model_and_tokenizer
    model = copy.deepcopy(model).eval()
    batch = collate(_examples(tok), pad_token_id=tok.pad_token_id)
    model.zero_grad()
    reference = model(**batch, use_cache=False).loss
    reference.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    labels = batch.pop("labels")
    hidden = model.get_decoder()(**batch, use_cache=False).last_hidden_state
    total = causal_lm_loss_sum(hidden, labels, model.get_output_embeddings(), chunk_size=chunk_size)
    loss = total / sum(num_loss_tokens(e) for e in _examples(tok))
    loss.backward()
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=1e-5)
    for got, want in zip((p.grad for p in model.parameters()), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_step_batches_do_not_depend_on_ranks_or_accumulation():
    tokens = list(range(1, 11))

    def steps(world_size, micro, start_step=0):
        per_rank = [
            list(
                StepBatchSampler(
                    tokens,
                    max_steps=5,
                    global_batch_size=4,
                    micro_batch_size=micro,
                    seed=1,
                    rank=r,
                    world_size=world_size,
                    start_step=start_step,
                )
            )
            for r in range(world_size)
        ]
        rounds = 4 // (micro * world_size)
        out = []
        for s in range(5 - start_step):
            batch = [
                item
                for r in range(world_size)
                for mb in per_rank[r][s * rounds : (s + 1) * rounds]
                for item in mb
            ]
            out.append(batch)
        return out

    one = steps(1, 4)
    assert steps(2, 2) == one and steps(1, 1) == one and steps(2, 1) == one
    assert steps(1, 2, start_step=3) == one[3:]
    for batch in one:  # every item carries its global batch's loss-token count
        assert {n for _, n in batch} == {sum(tokens[i] for i, _ in batch)}
    assert (
        len(
            StepBatchSampler(
                tokens, max_steps=5, global_batch_size=4, micro_batch_size=2, seed=1, start_step=3
            )
        )
        == 10
    )
    with pytest.raises(ValueError, match="global_batch_size=6 must be a multiple"):
        StepBatchSampler(tokens, max_steps=5, global_batch_size=6, micro_batch_size=4, seed=1)


def test_indivisible_global_batch_is_refused(tmp_path, tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    with pytest.raises(ValueError, match="trainer.global_batch_size=6 must be a multiple"):
        _train(model, tok, tmp_path, "m", global_batch_size=6)


@pytest.mark.slow
def test_packing_and_accumulation_train_like_one_big_batch(tmp_path, tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    big, info_big = _train(model, tok, tmp_path, "big", batch_size=8)
    accumulated, info_acc = _train(
        model, tok, tmp_path, "acc", batch_size=2, global_batch_size=8, packing=True
    )
    chunked, _ = _train(model, tok, tmp_path, "chunk", batch_size=4, global_batch_size=8, loss_chunk_size=16)
    assert info_acc["steps"] == info_big["steps"] == 12
    assert info_acc["first_loss"] == pytest.approx(info_big["first_loss"], rel=1e-5)
    assert info_acc["last_loss"] == pytest.approx(info_big["last_loss"], rel=1e-4)
    _assert_same_weights(accumulated, big)
    _assert_same_weights(chunked, big)


class _Interrupt(Exception):
    pass


# Full fine-tuning with a step budget; LoRA (adapters in the checkpoint, merged on export) with an epoch one.
@pytest.mark.parametrize(
    "variant", [{}, {"lora": {"r": 4}, "epochs": 1.2, "max_steps": 100}], ids=["full", "lora"]
)
def test_interrupted_m_step_resumes_to_the_same_weights(tmp_path, tiny_model_and_tokenizer, variant):
    from lightning.pytorch.callbacks import Callback

    class StopAt(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 7:
                raise _Interrupt

    model, tok = tiny_model_and_tokenizer
    settings = {"batch_size": 2, "global_batch_size": 4, "checkpoint_every_n_steps": 5, **variant}
    reference, info_ref = _train(model, tok, tmp_path / "a", "m", **settings)

    crashed = copy.deepcopy(model)
    with pytest.raises(_Interrupt):
        fine_tune(
            model=crashed,
            tokenizer=tok,
            pairs=_pairs(),
            out_dir=tmp_path / "b" / "m",
            settings=_settings(**settings),
            callbacks=[StopAt()],
        )
    partial = tmp_path / "b" / ".m.partial"
    assert [p.name for p in (partial / "checkpoints").iterdir()] == ["step-5.ckpt"]
    assert not (tmp_path / "b" / "m").exists()

    resumed = copy.deepcopy(model)  # a rerun starts from the base model again
    info = fine_tune(
        model=resumed,
        tokenizer=tok,
        pairs=_pairs(),
        out_dir=tmp_path / "b" / "m",
        settings=_settings(**settings),
    )
    assert info["resumed_from_step"] == 5
    assert info["steps"] == info_ref["steps"] == 12  # lora: ceil(1.2 epochs x 40 pairs / 4)
    assert info["first_loss"] == pytest.approx(info_ref["first_loss"])
    assert info["last_loss"] == pytest.approx(info_ref["last_loss"], rel=1e-5)
    _assert_same_weights(resumed, reference)
    assert not partial.exists(), "the checkpoints outlive the finished stage"


def test_checkpoints_of_other_settings_are_not_resumed(tmp_path, tiny_model_and_tokenizer):
    from train.checkpoints import CheckpointResume

    partial = tmp_path / ".m.partial"
    first = CheckpointResume(partial, settings=_settings(), pairs=_pairs())
    first.callbacks(5)
    (partial / "checkpoints").mkdir()
    (partial / "checkpoints" / "step-5.ckpt").write_bytes(b"x")
    assert CheckpointResume(partial, settings=_settings(), pairs=_pairs()).last().endswith("step-5.ckpt")
    assert CheckpointResume(partial, settings=_settings(lr=1e-4), pairs=_pairs()).last() is None
    assert not partial.exists()


def test_data_module_resumes_at_the_restored_step(tiny_model_and_tokenizer):
    _, tok = tiny_model_and_tokenizer
    examples, _ = tokenize_pairs(tok, _pairs(), max_length=512)
    data = PromptCompletionDataModule(
        examples, pad_token_id=tok.pad_token_id, batch_size=2, max_steps=6, global_batch_size=4
    )
    full = list(data.batch_sampler())
    assert list(data.batch_sampler(start_step=4)) == full[8:]


@pytest.mark.slow
def test_gradient_checkpointing_and_bf16_mixed_train(tmp_path, tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    reference, info_ref = _train(model, tok, tmp_path, "ref", max_steps=4)
    recomputed, _ = _train(model, tok, tmp_path, "ckpt", max_steps=4, gradient_checkpointing=True)
    _assert_same_weights(recomputed, reference)
    _, info_bf16 = _train(model, tok, tmp_path, "bf16", max_steps=4, precision="bf16-mixed")
    assert info_bf16["first_loss"] == pytest.approx(info_ref["first_loss"], rel=2e-2)
    assert info_bf16["first_loss"] != info_ref["first_loss"]  # autocast did run in bf16
