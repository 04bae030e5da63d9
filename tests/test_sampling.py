"""The sampling backends' contract on real-model conventions: the device, every end-of-completion id, one
BOS, the task's stop strings, exact candidate-only Gumbel noise, and a one-way import graph."""

from __future__ import annotations

import ast
import inspect
import itertools
from pathlib import Path

import polars as pl
import pytest
import torch
from conftest import DATA_DIR, TINY_SHAPE, needs_data
from omegaconf import OmegaConf
from transformers import LlamaForCausalLM

from factory.config import SamplerConfig, compose
from factory.models import build_tiny_model, train_char_tokenizer
from factory.sample import generate, sample_problems
from factory.sampling import hf
from factory.sampling.gumbel import filter_logits, gumbel_noise, pick_tokens
from factory.tasks import build_task

ROOT = Path(__file__).resolve().parents[1]
# A Llama-3-like chat template: it writes the BOS itself (as tests/test_tokens.py's).
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eot|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


# --- the device -------------------------------------------------------------------------------------


def test_best_device_is_cuda_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert hf.best_device() == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hf.best_device() == torch.device("cpu")


def test_load_policy_puts_the_model_on_the_best_device_in_its_dtype(monkeypatch, tiny_model_dir):
    monkeypatch.setattr(hf, "best_device", lambda: torch.device("meta"))  # a device this CPU machine has
    model = hf.load_policy(tiny_model_dir, dtype="bfloat16")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert model.dtype == torch.bfloat16 and not model.training


def _record_inputs(model):
    """Every tensor argument of every forward call, through a pre-hook (removed by the caller)."""
    calls: list[dict] = []

    def hook(_module, args, kwargs):
        calls.append({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)})

    return calls, model.register_forward_pre_hook(hook, with_kwargs=True)


def test_generate_feeds_the_model_on_its_device(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    calls, handle = _record_inputs(model)
    try:
        generate(model, tok, ["Q: a\nA: ", "Q: bb\nA: "], num_samples=2, temperature=1.0, top_k=5,
                 max_new_tokens=4, batch_size=2, progress=False)  # fmt: skip
    finally:
        handle.remove()
    assert calls and all(t.device == model.device for call in calls for t in call.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_greedy_on_cuda_matches_the_cpu(tiny_model_and_tokenizer):
    import copy

    model, tok = tiny_model_and_tokenizer
    prompts = ["Q: a\nA: ", "Q: Ann has 3 pens.\nA: "]
    kw = {"num_samples": 1, "temperature": 0.0, "max_new_tokens": 16, "batch_size": 2, "progress": False}
    on_cpu = generate(model, tok, prompts, **kw)
    on_gpu = generate(copy.deepcopy(model).to("cuda"), tok, prompts, **kw)
    assert [s[0]["completion"] for s in on_gpu] == [s[0]["completion"] for s in on_cpu]


# --- the decode loop's KV cache and attention --------------------------------------------------------


def test_grouped_query_decode_matches_transformers_generate(tiny_model_and_tokenizer):
    """A model with fewer key/value heads than query heads (SmolLM2: 3 of 9, Qwen2.5-0.5B: 2 of 14): the
    preallocated cache and SDPA's own GQA give transformers' greedy tokens on left-padded prompts."""
    from transformers import LlamaConfig

    _, tok = tiny_model_and_tokenizer
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        intermediate_size=128, max_position_embeddings=256, head_dim=16, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(1)
    model = LlamaForCausalLM(config).eval()
    prompts = ["Q: a\nA: ", "Q: a much longer prompt than the others\nA: ", "Q: 3+4\nA: "]
    ours = generate(model, tok, prompts, num_samples=2, temperature=0.0, max_new_tokens=20, batch_size=3)
    enc = tok(prompts, return_tensors="pt", padding=True)
    ref = model.generate(**enc, do_sample=False, max_new_tokens=20, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)  # fmt: skip
    for per, row in zip(ours, ref[:, enc["input_ids"].shape[1] :].tolist(), strict=True):
        n = row.index(tok.eos_token_id) if tok.eos_token_id in row else len(row)
        assert [s["completion"] for s in per] == [tok.decode(row[:n], skip_special_tokens=True)] * 2
    assert model.config._attn_implementation == "sdpa", "the decode loop must restore the model's attention"


# --- every end-of-completion id ---------------------------------------------------------------------


def test_a_completion_stops_at_any_eos_id_of_the_generation_config(tiny_model_and_tokenizer, monkeypatch):
    """Qwen base models end turns with ``<|im_end|>``, listed in generation_config.eos_token_id next to
    the tokenizer's EOS: sampling must stop at every id of that list."""
    model, tok = tiny_model_and_tokenizer
    prompts = ["Q: a\nA: ", "Q: Ann has 3 pens.\nA: ", "Q: 3+4\nA: "]
    kw = {"num_samples": 1, "temperature": 0.0, "max_new_tokens": 12, "batch_size": 3, "progress": False}
    free = [per[0] for per in generate(model, tok, prompts, **kw)]
    longest = max(range(len(prompts)), key=lambda i: free[i]["num_tokens"])
    ids = tok(free[longest]["completion"], add_special_tokens=False).input_ids
    assert len(ids) >= 4, "the tiny model's greedy completion is too short for this test"
    extra = ids[3]
    monkeypatch.setattr(model.generation_config, "eos_token_id", [tok.eos_token_id, extra])
    cut = generate(model, tok, prompts[longest : longest + 1], **kw)[0][0]
    at = ids.index(extra)
    assert cut["completion"] == tok.decode(ids[:at]) and cut["num_tokens"] == at
    assert cut["finish_reason"] == "stop"
    # The same ids given explicitly (what the E-step passes from factory.tokens.stop_token_ids).
    monkeypatch.undo()
    assert generate(model, tok, prompts[longest : longest + 1], stop_token_ids=[extra], **kw)[0][0] == cut


# --- one BOS ------------------------------------------------------------------------------------------


def test_a_rendered_chat_prompt_reaches_the_model_with_one_bos():
    tok = train_char_tokenizer(["Q: Ann has 3 pens.\nA: Answer: 3"])
    tok.add_special_tokens({"additional_special_tokens": ["<|eot|>"]})
    tok.chat_template = TEMPLATE
    model = build_tiny_model(tok, **TINY_SHAPE)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.startswith(tok.bos_token)
    calls, handle = _record_inputs(model)
    try:
        generate(
            model,
            tok,
            [prompt],
            num_samples=2,
            temperature=1.0,
            max_new_tokens=3,
            batch_size=1,
            progress=False,
        )
    finally:
        handle.remove()
    prefill = calls[0]["input_ids"][0].tolist()
    assert prefill.count(tok.bos_token_id) == 1 and prefill[0] == tok.bos_token_id


# --- the task's stop strings ----------------------------------------------------------------------------


def test_tasks_stop_strings_fit_their_prompt_styles():
    def stops(*overrides):
        cfg = compose([*overrides, f"paths.data_dir={DATA_DIR}"])
        return build_task(cfg.task, data_dir=cfg.paths.data_dir).stop_strings()

    assert stops() == ["\nQ:"]  # arith's Q: ... A: prompts
    for name in ("gsm8k", "math", "math500"):
        assert stops(f"task={name}", "task.prompt_style=plain") == ["\nQuestion:"]
        assert stops(f"task={name}", "task.prompt_style=fewshot") == ["\nQuestion:"]
        assert stops(f"task={name}", "task.prompt_style=chat") == []
    humaneval = stops("task=humaneval", "task.prompt_style=plain")
    assert {"\ndef", "\nclass", "\nif", "\nprint", "\n#"} <= set(humaneval)  # the Codex paper's stops
    mbpp = stops("task=mbpp", "task.prompt_style=plain")
    assert "\ndef" not in mbpp and "\nassert" in mbpp  # MBPP programs start with imports, then def
    assert "\nQUESTION" in stops("task=apps", "task.prompt_style=plain")
    for name in ("humaneval", "mbpp", "apps"):
        assert stops(f"task={name}", "task.prompt_style=chat") == []


def _scripted_model(tok, text: str, prompt_len: int):
    """A tiny Llama whose logits always pick the next token of ``text`` + EOS after a ``prompt_len``-token
    prompt (one prompt at a time), whatever the sampler's temperature or noise."""
    script = tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]

    class Scripted(LlamaForCausalLM):
        forward_calls = 0

        def forward(self, *args, **kwargs):
            Scripted.forward_calls += 1
            out = super().forward(*args, **kwargs)
            at = (kwargs["position_ids"][:, -1] - (prompt_len - 1)).clamp(max=len(script) - 1)
            logits = torch.full_like(out.logits[:, -1:], float("-inf"))
            logits[torch.arange(len(at)), 0, torch.tensor(script)[at]] = 0.0
            out.logits = logits
            return out

    Scripted.forward.__signature__ = inspect.signature(LlamaForCausalLM.forward)
    base = build_tiny_model(tok, **TINY_SHAPE)
    model = Scripted(base.config)
    model.load_state_dict(base.state_dict())
    return model.eval()


@pytest.fixture
def gsm8k_fewshot():
    needs_data("gsm8k/train.jsonl", "gsm8k/test.jsonl")
    cfg = compose(
        ["task=gsm8k", "task.prompt_style=fewshot", "task.num_shots=1", f"paths.data_dir={DATA_DIR}"]
    )
    task = build_task(cfg.task, data_dir=cfg.paths.data_dir)
    yield task
    task.close()


def test_a_fewshot_completion_is_cut_at_the_next_question_and_judged_before_it(tmp_path, gsm8k_fewshot):
    """The model answers, then writes the next few-shot block: the E-step stops there (without running to
    the token limit) and the verdict is on the answer, not on the next question's."""
    task = gsm8k_fewshot
    problem = task.load_problems(split="train", limit=1)[0]
    answer = f"So it is {problem['answer']}.\nThe answer is {problem['answer']}."
    text = (
        answer + "\n\nQuestion: Tom has 2 apples and eats one. How many are left?\nAnswer: The answer is 1."
    )
    tok = train_char_tokenizer([task.format_prompt(problem), text])
    prompt = task.format_prompt(problem, tokenizer=tok)
    model = _scripted_model(tok, text, prompt_len=len(tok(prompt).input_ids))
    settings = OmegaConf.merge(
        OmegaConf.structured(SamplerConfig),
        {"num_samples": 2, "max_new_tokens": 400, "batch_size": 1, "shard_size": 4, "temperature": 0.8},
    )
    out = tmp_path / "samples"
    sample_problems(model=model, tokenizer=tok, task=task, problems=[problem], out_dir=out, settings=settings,
                    policy="p0", iteration=1)  # fmt: skip
    rows = pl.read_parquet(sorted(out.glob("shard-*.parquet"))).to_dicts()
    assert [r["completion"] for r in rows] == [answer + "\n"] * 2
    assert {r["finish_reason"] for r in rows} == {"stop"}
    assert model.forward_calls < len(text), "decoding should stop at the stop string, not at EOS"
    cut, whole = task.verify([problem] * 2, [rows[0]["completion"], text], strictness="answer")
    assert cut["reward"] > 0 and cut["answer"] == problem["answer"]
    assert whole["reward"] == 0, "without the stop the next question's answer would be judged"


def test_eval_uses_the_task_stop_strings(tmp_path, gsm8k_fewshot, monkeypatch, make_cfg):
    from eval.evaluate import evaluate_model

    task = gsm8k_fewshot
    problem = task.load_problems(split="test", limit=1)[0]
    answer = f"The answer is {problem['answer']}."
    text = answer + "\n\nQuestion: How many legs has a cat?\nAnswer: The answer is 4."
    tok = train_char_tokenizer([task.format_prompt(problem), text])
    prompt = task.format_prompt(problem, tokenizer=tok)
    model = _scripted_model(tok, text, prompt_len=len(tok(prompt).input_ids))
    monkeypatch.setattr(hf, "load_policy", lambda path, dtype: model)
    monkeypatch.setattr("factory.models.load_tokenizer", lambda path: tok)
    cfg = make_cfg("eval.num_samples=2", "eval.ks=[1,2]", "eval.max_new_tokens=300")
    result = evaluate_model(model_path=tmp_path, task=task, problems=[problem], settings=cfg.eval,
                            out_dir=tmp_path / "eval")  # fmt: skip
    assert result["greedy_accuracy"] == 1.0
    greedy = pl.read_parquet(tmp_path / "eval" / "per_problem.parquet")["greedy_completion"].to_list()
    assert greedy == [answer + "\n"]


# --- exact candidate-only noise -------------------------------------------------------------------------


def _whole_vocabulary(logits, seeds, step, temperature, top_k, top_p):
    """The reference: noise hashed over the whole vocabulary (the sampler before candidate-only noise)."""
    scores = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return (scores + gumbel_noise(seeds, step, scores.shape[-1])).argmax(-1)


def test_candidate_noise_picks_the_same_tokens_as_whole_vocabulary_noise():
    """Noise only for the tokens that can win gives exactly the old samples: top-k on and off, top-p on
    and off, ties at the k-th score, masked logits, bf16 logits, SmolLM2's vocabulary size."""
    gen = torch.Generator().manual_seed(0)
    small = itertools.product((7, 1000), (0, 1, 5, 40, 1000), (1.0, 0.95, 0.5), (1.0, 0.7))
    large = itertools.product((49152,), (0, 40), (1.0, 0.9), (0.8,))
    for vocab, top_k, top_p, temperature in itertools.chain(small, large):
        for kind in ("normal", "ties", "masked", "bf16"):
            logits = torch.randn(6, vocab, generator=gen) * 3
            if kind == "ties":
                logits = logits.round()
            elif kind == "masked":
                logits[:, : vocab // 2] = float("-inf")
            elif kind == "bf16":
                logits = logits.to(torch.bfloat16)
            seeds = torch.randint(0, 2**31 - 1, (6,), generator=gen)
            for step in (0, 17):
                new = pick_tokens(logits, seeds=seeds, step=step, temperature=temperature, top_k=top_k,
                                  top_p=top_p)  # fmt: skip
                old = _whole_vocabulary(logits, seeds, step, temperature, top_k, top_p)
                assert torch.equal(new, old), (vocab, top_k, top_p, temperature, kind, step)


# --- one-way imports --------------------------------------------------------------------------------


def _factory_imports(path: Path) -> set[str]:
    """``factory.*`` modules a file imports anywhere (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("factory"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("factory"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from factory.sampling import hf`
    return found


def test_sample_and_the_sampling_package_import_one_way():
    """factory/sample.py uses factory/sampling/*; nothing there imports factory.sample, and the backends
    form no cycle among themselves."""
    files = {"factory.sample": ROOT / "factory" / "sample.py"}
    for path in sorted((ROOT / "factory" / "sampling").glob("*.py")):
        name = "factory.sampling" if path.stem == "__init__" else f"factory.sampling.{path.stem}"
        files[name] = path
    graph = {name: _factory_imports(path) & set(files) for name, path in files.items()}

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        return any(
            nxt == target or (nxt not in seen and reaches(nxt, target, seen | {nxt})) for nxt in graph[start]
        )

    cycles = sorted(name for name in graph if reaches(name, name, {name}))
    assert not cycles, f"import cycles through {cycles}: {graph}"
    assert not any("factory.sample" in graph[n] for n in graph if n != "factory.sample")
