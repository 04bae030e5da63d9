"""E-step: K samples per problem, seeded, greedy is deterministic, shards resume."""

from __future__ import annotations

import contextlib
import functools

import polars as pl
import torch
from omegaconf import OmegaConf

from factory.config import SamplerConfig
from factory.rundir import read_json
from factory.sample import generate, sample_problems


class _Task:
    def format_prompt(self, problem, *, tokenizer=None):
        return f"Q: {problem['question']}\nA: "


def _problems(n):
    return [{"problem_id": f"p{i}", "question": f"Ann has {i} pens.", "answer": str(i)} for i in range(n)]


def test_generate_shapes_seeding_and_greedy(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    prompts = ["Q: a\nA: ", "Q: longer prompt here\nA: ", "Q: b\nA: "]
    kw = {"max_new_tokens": 12, "batch_size": 2, "progress": False}
    out = generate(model, tok, prompts, num_samples=5, temperature=1.0, seed=7, **kw)
    assert [len(x) for x in out] == [5, 5, 5]
    assert all(
        0 <= s["num_tokens"] <= 12 and s["finish_reason"] in ("stop", "length") for x in out for s in x
    )
    again = generate(model, tok, prompts, num_samples=5, temperature=1.0, seed=7, **kw)
    assert out == again
    other = generate(model, tok, prompts, num_samples=5, temperature=1.0, seed=8, **kw)
    assert out != other
    assert len({s["completion"] for s in out[1]}) > 1, "samples at temperature 1 should differ"
    greedy = generate(model, tok, prompts, num_samples=1, temperature=0.0, seed=0, **kw)
    # Greedy output does not depend on batching or on the other prompts in the batch.
    alone = generate(model, tok, prompts[1:2], num_samples=1, temperature=0.0, seed=0, **kw)
    assert greedy[1] == alone[0]


def test_sample_problems_writes_and_resumes_shards(tmp_path, tiny_model_and_tokenizer, monkeypatch):
    model, tok = tiny_model_and_tokenizer
    settings = OmegaConf.merge(
        OmegaConf.structured(SamplerConfig),
        {"num_samples": 3, "max_new_tokens": 8, "batch_size": 4, "shard_size": 4},
    )
    out = tmp_path / "iter_1" / "samples"
    problems = _problems(10)
    # Simulate a crash after the second shard: the third generate call raises.
    import factory.sample as sample_module

    calls = {"n": 0}
    real_generate = sample_module.generate

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real_generate(*args, **kwargs)

    run_e_step = functools.partial(
        sample_problems,
        model=model,
        tokenizer=tok,
        task=_Task(),
        problems=problems,
        out_dir=out,
        settings=settings,
        policy="p0",
        iteration=1,
    )
    monkeypatch.setattr(sample_module, "generate", flaky)
    with contextlib.suppress(KeyboardInterrupt):
        run_e_step()
    assert not out.exists(), "an unfinished E-step must not look finished"
    partial = tmp_path / "iter_1" / ".samples.partial"
    assert len(list(partial.glob("shard-*.parquet"))) == 2
    monkeypatch.setattr(sample_module, "generate", real_generate)
    result = run_e_step()
    assert result["generated"] == 2 * 3  # only the last shard (2 problems x 3 samples) was generated
    df = pl.read_parquet(sorted(out.glob("shard-*.parquet")))
    assert df.height == 30
    assert df.select(["problem_id", "sample_idx"]).is_unique().all()
    assert set(df.columns) >= {
        "problem_id",
        "sample_idx",
        "prompt",
        "completion",
        "num_tokens",
        "finish_reason",
        "policy",
        "seed",
    }
    assert read_json(out / "stage.json")["num_samples"] == 30


def test_shared_prefix_matches_plain_generate(tiny_model_and_tokenizer):
    """Prefilling each prompt once and repeating its cache K times gives the same tokens as K copies."""
    from factory.sample import _generate_shared_prefix

    model, tok = tiny_model_and_tokenizer
    enc = tok(["Q: a\nA: ", "Q: a longer one\nA: "], return_tensors="pt", padding=True)
    kw = {
        "max_new_tokens": 10,
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
        "do_sample": False,
    }
    shared = _generate_shared_prefix(model, dict(enc), num_samples=3, **kw)
    repeated = {k: v.repeat_interleave(3, dim=0) for k, v in enc.items()}
    plain = model.generate(**repeated, **kw)
    assert shared.tolist() == plain.tolist()
    torch.manual_seed(5)
    sampled = _generate_shared_prefix(model, dict(enc), num_samples=3, **{**kw, "do_sample": True})
    torch.manual_seed(5)
    assert sampled.tolist() == model.generate(**repeated, **{**kw, "do_sample": True}).tolist()
