"""E-step: K samples per problem, seeded, greedy is deterministic, shards resume."""

from __future__ import annotations

import contextlib
import functools

import polars as pl
import pytest
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
    assert [g["completion"] for g in greedy[1]] == [a["completion"] for a in alone[0]]


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


def test_hf_greedy_matches_transformers_generate(tiny_model_and_tokenizer):
    """The own decode loop (shared prefix, dropped finished rows) gives transformers' greedy tokens."""
    model, tok = tiny_model_and_tokenizer
    prompts = ["Q: a\nA: ", "Q: a longer one\nA: ", "Q: 3+4\nA: "]
    ours = generate(model, tok, prompts, num_samples=3, temperature=0.0, max_new_tokens=10, batch_size=2)
    enc = tok(prompts, return_tensors="pt", padding=True)
    ref = model.generate(
        **enc,
        do_sample=False,
        max_new_tokens=10,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    for per, row in zip(ours, ref[:, enc["input_ids"].shape[1] :].tolist(), strict=True):
        n = row.index(tok.eos_token_id) if tok.eos_token_id in row else len(row)
        assert [s["completion"] for s in per] == [tok.decode(row[:n], skip_special_tokens=True)] * 3
        assert per[0]["num_tokens"] == n


def test_hf_sample_j_depends_only_on_its_seed(tiny_model_and_tokenizer):
    """Sample j of a prompt is the same for any K, batch size, prompt order and batch company."""
    model, tok = tiny_model_and_tokenizer
    prompts = [f"Q: {x}\nA: " for x in ("a", "bb 2", "ccc", "a longer prompt", "5")]
    seeds = [11, 2000, 3_000_000, 7, 2**31 - 2]
    kw = {"temperature": 1.0, "top_k": 20, "top_p": 0.95, "max_new_tokens": 12, "progress": False}
    four = generate(model, tok, prompts, num_samples=4, batch_size=5, seeds=seeds, **kw)
    two = generate(model, tok, prompts, num_samples=2, batch_size=2, seeds=seeds, **kw)
    assert [per[:2] for per in four] == two
    rev = generate(model, tok, prompts[::-1], num_samples=4, batch_size=1, seeds=seeds[::-1], **kw)
    assert rev[::-1] == four
    alone = generate(model, tok, prompts[3:4], num_samples=3, batch_size=1, seeds=seeds[3:4], **kw)
    assert alone[0] == four[3][:3]
    assert [[s["seed"] for s in per] for per in four] == [[s + j for j in range(4)] for s in seeds]
    assert all(len({s["completion"] for s in per}) == 4 for per in four), "samples at T=1 should differ"


def test_gumbel_max_samples_the_filtered_distribution():
    """Seeded Gumbel-max draws follow softmax(logits / T) after top-k / top-p masking."""
    from factory.sampling.hf import pick_tokens

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    rows = 20000
    logits = probs.log().expand(rows, -1)
    seeds = torch.arange(rows) * 7919

    def freq(**kw):
        tokens = pick_tokens(logits, seeds=seeds, step=3, **kw)
        return torch.bincount(tokens, minlength=4).float() / rows

    assert torch.allclose(freq(temperature=1.0, top_k=0, top_p=1.0), probs, atol=0.015)
    assert torch.allclose(
        freq(temperature=1.0, top_k=2, top_p=1.0), torch.tensor([0.625, 0.375, 0, 0]), atol=0.015
    )
    # top_p=0.9 keeps the smallest head holding 90%: the first three tokens.
    kept = probs[:3] / probs[:3].sum()
    assert torch.allclose(freq(temperature=1.0, top_k=0, top_p=0.9)[:3], kept, atol=0.015)
    sharp = (probs.log() / 0.5).softmax(-1)
    assert torch.allclose(freq(temperature=0.5, top_k=0, top_p=1.0), sharp, atol=0.015)
    other_step = pick_tokens(logits, seeds=seeds, step=4, temperature=1.0, top_k=0, top_p=1.0)
    assert not torch.equal(
        other_step, pick_tokens(logits, seeds=seeds, step=3, temperature=1.0, top_k=0, top_p=1.0)
    )


def test_hf_stop_strings_cut_completions(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    prompts = ["Q: a\nA: ", "Q: 3+4\nA: "]
    kw = {"num_samples": 3, "temperature": 1.0, "max_new_tokens": 16, "batch_size": 2, "seeds": [1, 2]}
    full = generate(model, tok, prompts, **kw)
    cut = generate(model, tok, prompts, stop=["a", "1"], **kw)
    for per_full, per_cut in zip(full, cut, strict=True):
        for f, c in zip(per_full, per_cut, strict=True):
            at = min((f["completion"].find(s) for s in ("a", "1") if s in f["completion"]), default=-1)
            if at < 0:
                assert c == f
            else:
                assert c["completion"] == f["completion"][:at] and c["finish_reason"] == "stop"
                assert c["num_tokens"] == len(tok(f["completion"][: at + 1])["input_ids"]) - 1  # minus <s>


def test_sample_shards_do_not_change_samples(tmp_path, tiny_model_and_tokenizer):
    """Shard size and K do not change sample j of a problem; the seed column is its per-sample seed."""
    from factory.sample import problem_seed

    model, tok = tiny_model_and_tokenizer
    frames = []
    for name, k, shard, batch in (("a", 4, 4, 3), ("b", 2, 3, 2)):
        settings = OmegaConf.merge(
            OmegaConf.structured(SamplerConfig),
            {
                "num_samples": k,
                "max_new_tokens": 8,
                "batch_size": batch,
                "shard_size": shard,
                "temperature": 1.0,
            },
        )
        out = tmp_path / name / "samples"
        sample_problems(
            model=model, tokenizer=tok, task=_Task(), problems=_problems(7), out_dir=out, settings=settings,
            policy="p0", iteration=1,
        )  # fmt: skip
        frames.append(pl.read_parquet(sorted(out.glob("shard-*.parquet"))).sort("problem_id", "sample_idx"))
    four, two = frames
    assert four.filter(pl.col("sample_idx") < 2).equals(two)
    expected = [problem_seed(0, p) + j for p, j in zip(four["problem_id"], four["sample_idx"], strict=True)]
    assert four["seed"].to_list() == expected


def test_policy_draw_counts_repeated_e_steps_of_one_policy():
    """After an empty snapshot the next E-step samples the same policy again: it must draw new seeds."""
    from factory.sample import problem_seed
    from factory.stage_inputs import policy_draw

    class _Run:
        def __init__(self, models):
            self.models = models

        def is_done(self, k, stage):
            return stage == "model" and k in self.models

    assert [policy_draw(_Run({1, 2}), k) for k in (1, 2, 3)] == [0, 0, 0]
    assert [policy_draw(_Run({1}), k) for k in (2, 3, 4)] == [0, 1, 2]  # iterations 2, 3 trained nothing
    assert policy_draw(_Run(set()), 3) == 2
    assert problem_seed(0, "p1", 0) == problem_seed(0, "p1") != problem_seed(0, "p1", 1)


def test_vllm_sampler_config_composes(make_cfg):
    cfg = make_cfg("sampler=vllm", "sampler.tensor_parallel_size=2")
    assert cfg.sampler.backend == "vllm" and cfg.sampler.tensor_parallel_size == 2
    assert cfg.sampler.dtype == cfg.model.dtype and cfg.sampler.num_samples == 4  # the test shrink applies
    with pytest.raises(Exception, match="gpu_memory_utilisation"):
        make_cfg("sampler=vllm", "sampler.gpu_memory_utilisation=0.5")
    with pytest.raises(Exception, match="tensor_parallel_size"):
        make_cfg("sampler.tensor_parallel_size=2")  # an hf sampler has no engine keys


def test_worker_processes_draw_the_samples_one_process_draws(
    tmp_path, tiny_model_dir, tiny_model_and_tokenizer
):
    """sampler.workers=2 (two spawned processes, one thread each) writes the rows workers=1 writes."""
    model, tok = tiny_model_and_tokenizer
    frames = []
    for workers in (1, 2):
        settings = OmegaConf.merge(
            OmegaConf.structured(SamplerConfig),
            {"num_samples": 3, "max_new_tokens": 8, "batch_size": 2, "shard_size": 5, "temperature": 1.0,
             "workers": workers, "threads": 1},
        )  # fmt: skip
        out = tmp_path / f"w{workers}" / "samples"
        sample_problems(
            model=model if workers == 1 else None, tokenizer=tok, task=_Task(), problems=_problems(9),
            out_dir=out, settings=settings, policy=str(tiny_model_dir), iteration=1,
        )  # fmt: skip
        frames.append(pl.read_parquet(sorted(out.glob("shard-*.parquet"))).sort("problem_id", "sample_idx"))
    one, two = frames
    assert one.height == 27 and one.equals(two)


def test_worker_settings_are_checked_and_do_not_change_fingerprints(make_cfg):
    from factory.config import validate
    from factory.versioning import SAMPLER_THROUGHPUT_KEYS

    assert {"workers", "threads"} <= set(SAMPLER_THROUGHPUT_KEYS)
    with pytest.raises(ValueError, match="sampler.workers must be >= 1"):
        validate(make_cfg("sampler.workers=0"))
    with pytest.raises(ValueError, match="sampler.threads must be >= 1 or null"):
        validate(make_cfg("sampler.threads=0"))


def test_evaluation_in_worker_processes_reports_what_one_process_reports(tmp_path, tiny_model_dir, make_cfg):
    """eval with sampler.workers=2 writes the per-problem rows and metrics of sampler.workers=1."""
    from eval.evaluate import evaluate_model
    from factory.tasks import build_task

    results = []
    for workers in (1, 2):
        cfg = make_cfg(f"sampler.workers={workers}", "sampler.threads=1", "eval.max_new_tokens=8")
        task = build_task(cfg.task)
        problems = task.load_problems(split="test", limit=6)
        out = tmp_path / f"eval{workers}"
        metrics = evaluate_model(
            model_path=tiny_model_dir, task=task, problems=problems, settings=cfg.eval, out_dir=out,
            sampler_settings=cfg.sampler,
        )  # fmt: skip
        task.close()
        metrics.pop("seconds")
        results.append((metrics, pl.read_parquet(out / "per_problem.parquet")))
    (m1, rows1), (m2, rows2) = results
    assert m1 == m2 and rows1.equals(rows2) and rows1.height == 6


def test_a_cpu_vllm_engine_gets_every_core_unless_sampler_threads_says(monkeypatch):
    """vLLM's CPU build serves on 1 torch thread by itself; the engine gets sampler.threads, else
    $OMP_NUM_THREADS, else every core this process may use. GPU engines keep vLLM's own setting."""
    import os

    import torch
    from omegaconf import OmegaConf

    from factory.config import VllmSamplerConfig
    from factory.sample import vllm_engine_options
    from factory.sampling.vllm_backend import engine_threads

    default, _ = vllm_engine_options(OmegaConf.structured(VllmSamplerConfig()))
    one, _ = vllm_engine_options(OmegaConf.structured(VllmSamplerConfig(threads=1)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert engine_threads(default) == len(os.sched_getaffinity(0)) and engine_threads(one) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert engine_threads(default) == 3 and engine_threads(one) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert engine_threads(default) is None and engine_threads(one) is None


def test_the_engine_process_sets_its_threads_before_vllm_starts(monkeypatch, tmp_path):
    """build_engine (in the engine's own process) sets OMP_NUM_THREADS, which vLLM reads when it starts,
    and torch's thread count, before it builds the engine (a stand-in ``vllm`` module records both)."""
    import os
    import sys
    import types

    import torch

    from factory.sampling.vllm_backend import build_engine

    seen = []

    class LLM:
        def __init__(self, **kwargs):
            seen.append((os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()))

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # restored afterwards, like the variables below
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    before = torch.get_num_threads()
    try:
        build_engine(str(tmp_path), dtype="float32", seed=0, options={"threads": 1})
    finally:
        torch.set_num_threads(before)
    assert seen == [("1", 1)]
