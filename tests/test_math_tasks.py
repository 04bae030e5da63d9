"""The GSM8K / MATH / MATH-500 tasks: loading and splits, prompts, the Hub path, errors, the loop end to end."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import DATA_DIR, needs_data

import factory.loop as loop
from factory.base_model import base_model_key
from factory.config import compose
from factory.tasks import build_task

FILES = {
    "gsm8k": ["gsm8k/train.jsonl", "gsm8k/test.jsonl"],
    "math": ["math/train.jsonl", "math/test.jsonl"],
    "math500": ["math/train.jsonl", "math/test.jsonl", "prm800k_math_splits/test.jsonl"],
}
TEST_SIZES = {"gsm8k": 1319, "math": 5000, "math500": 500}
# num_train=null: the whole pool between the 500 human and the 500 validation problems (GSM8K's 7,473;
# MATH's 7,500 and MATH-500's 12,000, each less the 2 training problems whose solution boxes nothing).
TRAIN_SIZES = {"gsm8k": 6473, "math": 6498, "math500": 10998}
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _task(name: str, *overrides: str, data_dir=DATA_DIR):
    cfg = compose([f"task={name}", f"paths.data_dir={data_dir}", *overrides])
    return build_task(cfg.task, data_dir=cfg.paths.data_dir)


@pytest.mark.parametrize("name", ["gsm8k", "math", "math500"])
def test_splits_are_sized_disjoint_stable_and_have_golds(name):
    needs_data(*FILES[name])
    task = _task(name)
    splits = {s: task.load_problems(split=s) for s in ("human", "train", "validation", "test")}
    assert {s: len(p) for s, p in splits.items()} == {
        "human": 500,
        "train": TRAIN_SIZES[name],
        "validation": 500,
        "test": TEST_SIZES[name],
    }
    ids = {s: [p["problem_id"] for p in problems] for s, problems in splits.items()}
    assert sum(len(set(v)) for v in ids.values()) == len(set().union(*map(set, ids.values())))
    assert ids == {s: [p["problem_id"] for p in _task(name).load_problems(split=s)] for s in ids}
    assert all(p["answer"].strip() and p["question"] and p["solution"] for v in splits.values() for p in v)
    assert task.load_problems(split="test", limit=3) == splits["test"][:3]


def test_gsm8k_ids_and_solution_format():
    needs_data(*FILES["gsm8k"])
    problems = _task("gsm8k").load_problems(split="human")
    assert problems[0]["problem_id"] == "gsm8k-train-0"
    for p in problems:
        assert "<<" not in p["solution"] and "####" not in p["solution"]
        assert p["solution"].endswith(f"\nThe answer is {p['answer']}.")


def test_math500_pool_is_all_of_math_minus_its_test_ids():
    needs_data(*FILES["math500"])
    task = _task("math500", "task.num_human=0", "task.num_validation=0", "task.num_train=null")
    pool = {p["problem_id"] for p in task.load_problems(split="train")}
    test = {p["problem_id"] for p in task.load_problems(split="test")}
    assert len(test) == 500 and not pool & test
    # 12,500 MATH problems minus the 500, minus the 2 whose reference solution boxes nothing.
    assert len(pool) == 11_998
    assert "test/precalculus/807.json" in test and "train/algebra/0.json" in pool


@pytest.mark.parametrize("name", ["gsm8k", "math500"])
def test_human_solutions_pass_the_tasks_own_verifier(name):
    needs_data(*FILES[name])
    task = _task(name)
    problems = random.Random(0).sample(task.load_problems(split="human"), 50)
    try:
        verdicts = task.verify(problems, [p["solution"] for p in problems])
        again = task.verify(problems[:2], [p["solution"] for p in problems[:2]])  # the pool is reused
    finally:
        task.close()
    assert task._verifier is None
    correct = sum(v["reward"] == 1.0 for v in verdicts)
    # A few MATH references box several values (docs/math_verifier.md): judged hedged, by design.
    assert correct >= (50 if name == "gsm8k" else 47), [v for v in verdicts if v["reward"] < 1][:3]
    assert [v["status"] for v in again] == [v["status"] for v in verdicts[:2]]


def test_plain_and_fewshot_prompts():
    needs_data(*FILES["gsm8k"])
    problem = _task("gsm8k").load_problems(split="test")[0]
    assert _task("gsm8k").format_prompt(problem) == f"Question: {problem['question']}\nAnswer: "
    task = _task("gsm8k", "task.prompt_style=fewshot", "task.num_shots=3", "task.num_human=10")
    human = task.load_problems(split="human")
    prompt = task.format_prompt(problem)
    assert prompt.count("Question: ") == 4 and prompt.endswith(f"Question: {problem['question']}\nAnswer: ")
    assert prompt.startswith(f"Question: {human[0]['question']}\nAnswer: {human[0]['solution']}\n\n")
    # A human problem is never among its own shots: the next human problem takes its place.
    own = task.format_prompt(human[1])
    assert own.count(human[1]["question"]) == 1 and human[3]["question"] in own
    with pytest.raises(ValueError, match="num_shots"):
        _task("gsm8k", "task.prompt_style=fewshot", "task.num_shots=10", "task.num_human=10")


@pytest.mark.parametrize("name, instruction", [("gsm8k", "The answer is N."), ("math500", "\\boxed{}")])
def test_chat_prompt_uses_the_tokenizers_template(name, instruction):
    from factory.models import train_char_tokenizer

    needs_data(*FILES[name])
    task = _task(name, "task.prompt_style=chat")
    problem = task.load_problems(split="test")[0]
    tokenizer = train_char_tokenizer(["abc"])
    tokenizer.chat_template = CHAT_TEMPLATE
    prompt = task.format_prompt(problem, tokenizer=tokenizer)
    assert prompt.startswith(f"<|user|>{problem['question']}\n\n") and prompt.endswith("<|assistant|>")
    assert instruction in prompt
    with pytest.raises(ValueError, match="prompt_style=chat needs a tokenizer"):
        task.format_prompt(problem)
    with pytest.raises(ValueError, match="chat template"):
        task.format_prompt(problem, tokenizer=train_char_tokenizer(["abc"]))


def test_hub_source_calls_load_dataset_with_the_configured_names(monkeypatch, tmp_path):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, *, split):
        calls.append((name, config, split))
        if name == "HuggingFaceH4/MATH-500":
            return [{"problem": "Q0", "solution": "\\boxed{1}", "answer": "1", "unique_id": "test/a/0.json"}]
        if name == "openai/gsm8k":
            return [
                {"question": f"{split} {i}?", "answer": f"1+{i} = <<1+{i}={i + 1}>>{i + 1}\n#### {i + 1}"}
                for i in range(6)
            ]
        # A Hub copy of MATH without unique_ids: the MATH-500 problem is excluded by its text.
        return [
            {"problem": q, "solution": "\\boxed{2}", "level": "Level 2", "type": "Algebra"}
            for q in ("Q0", "Q1")
        ]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    no_files = tmp_path / "absent"
    task = _task(
        "gsm8k",
        "task.source=hub",
        "task.num_human=2",
        "task.num_train=2",
        "task.num_validation=2",
        data_dir=no_files,
    )
    assert [p["problem_id"] for p in task.load_problems(split="train")] == ["gsm8k-train-2", "gsm8k-train-3"]
    assert task.load_problems(split="human")[0]["solution"] == "1+0 = 1\nThe answer is 1."
    assert len(task.load_problems(split="test")) == 6
    assert calls == [("openai/gsm8k", "main", "train"), ("openai/gsm8k", "main", "test")]

    calls.clear()
    task = _task(
        "math500",
        "task.source=hub",
        "task.num_human=1",
        "task.num_train=0",
        "task.num_validation=0",
        "task.hub_pool_name=some/math",
        "task.hub_pool_config=[algebra,geometry]",
        data_dir=no_files,
    )
    human = task.load_problems(split="human")
    assert [p["question"] for p in human] == ["Q1"] and human[0]["level"] == 2
    assert task.load_problems(split="test")[0]["problem_id"] == "test/a/0.json"
    assert calls[0] == ("HuggingFaceH4/MATH-500", None, "test")
    assert calls[1:] == [("some/math", c, s) for s in ("train", "test") for c in ("algebra", "geometry")]


def test_missing_data_dir_names_the_path_and_the_setting(tmp_path):
    task = _task("math500", data_dir=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="paths.data_dir") as err:
        task.load_problems(split="test")
    assert str(tmp_path / "nowhere") in str(err.value) and "RESTEM_DATA_DIR" in str(err.value)


def test_empty_or_overlapping_selection_is_a_clear_error():
    needs_data(*FILES["gsm8k"])
    with pytest.raises(ValueError, match=r"zero 'train' problems.*num_train=0"):
        _task("gsm8k", "task.num_train=0").load_problems(split="train")
    with pytest.raises(ValueError, match=r"zero 'test' problems.*num_test=0"):
        _task("gsm8k", "task.num_test=0").load_problems(split="test")
    with pytest.raises(ValueError, match="too few for num_human=500"):
        _task("gsm8k", "task.max_chars=200").load_problems(split="human")
    # num_train=null (the default: the rest of the pool) on a pool too small says so, not "num_train=-889".
    with pytest.raises(ValueError, match=r"has 111 problems left after filtering by max_chars=200, too few"):
        _task("gsm8k", "task.max_chars=200", "task.num_train=null").load_problems(split="train")


@pytest.mark.parametrize(
    "override, message",
    [
        ("task.prompt_style=socratic", "task.prompt_style"),
        ("task.source=ftp", "task.source"),
        ("task.strictness=steps", "task.strictness"),
    ],
)
def test_bad_task_values_fail_with_the_key(override, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        compose(["task=gsm8k", override])


def test_base_model_key_follows_every_setting_that_changes_the_weights():
    key = base_model_key(compose())
    assert key == base_model_key(compose())
    # The human data, the model's shape, the pretraining budget.
    assert base_model_key(compose(["task=gsm8k"])) != base_model_key(
        compose(["task=gsm8k", "task.num_human=8"])
    )
    assert base_model_key(compose(["model.tiny.num_layers=2"])) != key
    assert base_model_key(compose(["model.pretrain.max_steps=10"])) != key
    # Trainer settings that pretraining inherits change the weights (a stale cached model was reused).
    for override in ("trainer.seed=1", "trainer.weight_decay=0.1", "trainer.grad_clip=0.5"):
        assert base_model_key(compose([override])) != key, override
    # ... unless model.pretrain overrides them, or they only say where it runs and what it shows.
    for override in (
        "trainer.max_steps=7",
        "trainer.lr=0.5",
        "trainer.progress_bar=false",
        "trainer.devices=2",
    ):
        assert base_model_key(compose([override])) == key, override


# Train == human (train_start=0) and enough pretraining to memorise 8 short solutions: the E-step then
# finds correct samples, so the M-step runs on a non-empty snapshot (measured: all 8 problems solved).
E2E = [
    "task.num_human=8",
    "task.num_train=8",
    "task.train_start=0",
    "task.num_validation=4",
    "task.num_test=4",
    "model.pretrain.max_steps=300",
    "model.pretrain.lr=3e-3",
    "sampler.max_new_tokens=128",
    "eval.max_new_tokens=48",
    "eval.num_samples=2",
    "eval.ks=[1,2]",
    "loop.iterations=1",
]


@pytest.mark.slow
@pytest.mark.parametrize("name, max_chars", [("gsm8k", 200), ("math500", 150)])
def test_loop_end_to_end_on_a_benchmark(name, max_chars, make_cfg, monkeypatch):
    needs_data(*FILES[name])
    built = []

    def recording_build_task(*args, **kwargs):
        built.append(build_task(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(loop, "build_task", recording_build_task)
    cfg = make_cfg(f"task={name}", f"paths.data_dir={DATA_DIR}", f"task.max_chars={max_chars}", *E2E)
    rows = loop.run(cfg)
    assert [r["iteration"] for r in rows] == [0, 1, "sft_human"]
    assert rows[1]["num_kept"] > 0 and rows[1]["num_problems_solved"] > 0
    assert rows[1]["share_kept_with_valid_steps"] is None  # the math verifier checks answers only
    summary = json.loads((Path(cfg.paths.run_dir) / "summary.json").read_text())
    assert [r["iteration"] for r in summary] == [0, 1, "sft_human"]
    assert built and all(t._verifier is None for t in built)  # the loop closed the verifier pool
