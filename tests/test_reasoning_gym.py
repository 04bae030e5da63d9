"""reasoning-gym tasks: seeded disjoint splits, the score_answer verifier and its guards, config errors,
prompts, and ``restem experiment=reasoning_gym_tiny`` end to end through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip(
    "reasoning_gym",
    reason="reasoning-gym is not installed: pip install -e '.[reasoning-gym]' (make test does)",
)

from factory.config import compose  # noqa: E402
from factory.tasks import build_task  # noqa: E402
from factory.tasks.reasoning_gym_task import (  # noqa: E402
    CHAT_INSTRUCTION,
    SPLITS,
    generate_splits,
    split_seed,
)
from factory.verifiers import reasoning_gym as rg_verifier  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# chain_sum with two one-digit terms has 200 distinct questions: small enough that independently seeded
# splits collide, so the disjointness rule has work to do.
SMALL_SPACE = "task.dataset_config={min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 1}"
SIZES = ["task.num_human=40", "task.num_train=40", "task.num_validation=20", "task.num_test=30"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _task(*overrides: str):
    cfg = compose(["task=reasoning_gym", "task.dataset=chain_sum", SMALL_SPACE, *SIZES, *overrides])
    return build_task(cfg.task)


@pytest.fixture(scope="module")
def task():
    one = _task()
    yield one
    one.close()


# ---- splits --------------------------------------------------------------------------------------------


def test_splits_have_their_sizes_stable_ids_and_answer_line_solutions(task):
    sizes = {"human": 40, "train": 40, "validation": 20, "test": 30}
    for split in SPLITS:
        problems = task.load_problems(split=split)
        assert len(problems) == sizes[split]
        ids = [p["problem_id"] for p in problems]
        assert len(set(ids)) == len(ids) and all(i.startswith(f"chain_sum-{split}-") for i in ids)
        assert all(p["solution"] == f"Answer: {p['answer']}" for p in problems)
    assert task.load_problems(split="test", limit=5) == task.load_problems(split="test")[:5]
    with pytest.raises(ValueError, match="split must be one of"):
        task.load_problems(split="dev")


def test_splits_are_deterministic_and_depend_on_the_seed(task):
    before = {s: task.load_problems(split=s) for s in SPLITS}
    generate_splits.cache_clear()  # regenerate from scratch, as a new process would
    assert {s: _task().load_problems(split=s) for s in SPLITS} == before
    other = _task("task.seed=1").load_problems(split="train")
    assert [p["question"] for p in other] != [p["question"] for p in before["train"]]
    assert len({split_seed(0, s) for s in SPLITS}) == 4  # a different generator seed per split


def test_splits_are_disjoint_although_the_generators_overlap(task):
    import reasoning_gym

    config = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    raw = {
        s: {reasoning_gym.create_dataset("chain_sum", seed=split_seed(0, s), size=60, **config)[i]["question"]
            for i in range(60)}
        for s in ("train", "test")
    }  # fmt: skip
    assert raw["train"] & raw["test"], "the generators alone would share questions: the test proves nothing"
    questions = {s: [p["question"] for p in task.load_problems(split=s)] for s in SPLITS}
    for split, texts in questions.items():
        assert len(set(texts)) == len(texts), f"{split} repeats a question"
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            assert not set(questions[a]) & set(questions[b]), f"{a} and {b} share questions"


def test_too_few_distinct_questions_is_a_clear_error():
    with pytest.raises(ValueError, match=r"only \d+ of task.num_train=300 train questions are distinct"):
        _task("task.num_train=300").load_problems(split="train")


def test_a_dataset_without_reference_answers_has_no_human_split():
    task = build_task(compose(["task=reasoning_gym", "task.dataset=graph_color", *SIZES]).task)
    assert task.load_problems(split="train", limit=1)[0]["answer"] is None
    with pytest.raises(ValueError, match="has no reference answers.*task.num_human=0"):
        task.load_problems(split="human")


def test_human_data_fingerprint_keys_the_dataset_and_the_generator_version(task):
    from importlib.metadata import version

    fingerprint = task.human_data_fingerprint()
    assert fingerprint["dataset"] == "chain_sum" and fingerprint["reasoning_gym"] == version("reasoning-gym")
    assert _task("task.dataset=gcd", "task.dataset_config=null").human_data_fingerprint() != fingerprint
    assert _task("task.num_train=41").human_data_fingerprint() == fingerprint  # train never reaches p0


# ---- prompts -------------------------------------------------------------------------------------------


def test_plain_and_chat_prompts(task):
    from factory.models import train_char_tokenizer

    problem = task.load_problems(split="test")[0]
    assert task.format_prompt(problem) == f"Q: {problem['question']}\nA: "
    assert task.stop_strings() == ["\nQ:"]
    chat = _task("task.prompt_style=chat")
    tokenizer = train_char_tokenizer(["abc"])
    tokenizer.chat_template = CHAT_TEMPLATE
    assert chat.format_prompt(problem, tokenizer=tokenizer) == (
        f"<|user|>{problem['question']}\n\n{CHAT_INSTRUCTION}\n<|assistant|>"
    )
    assert '"Answer: "' in CHAT_INSTRUCTION and chat.stop_strings() == []
    with pytest.raises(ValueError, match="prompt_style=chat needs a tokenizer with a chat template"):
        chat.format_prompt(problem)


# ---- the verifier --------------------------------------------------------------------------------------


def test_extract_answer_reads_the_last_answer_line_to_the_end():
    assert rg_verifier.extract_answer("4 - 1 = 3\nAnswer: 3") == "3"
    assert rg_verifier.extract_answer("Answer: 1\nno, wait.\nAnswer:  -4 \n") == "-4"
    assert rg_verifier.extract_answer("**Answer:** 12") == "12"
    assert rg_verifier.extract_answer("Answer: **12**") == "12"
    assert rg_verifier.extract_answer("Answer:\n1 2\n3 4") == "1 2\n3 4"  # grids span lines
    # Without "Answer:", the last "the answer is X" (SmolLM2's usual ending), X to the end of its line.
    assert rg_verifier.extract_answer("The final answer is 1754. So, the answer is 1754.") == "1754"
    assert rg_verifier.extract_answer('Therefore, the answer is "18".') == "18"
    assert rg_verifier.extract_answer("So the answer is: 0.33\nThanks!") == "0.33"
    assert rg_verifier.extract_answer("the ANSWER IS **-4**") == "-4"
    assert rg_verifier.extract_answer("The answer is") is None
    assert rg_verifier.extract_answer("The answer is 18. Let me check: 9 + 9 = 18.") == "18"
    assert rg_verifier.extract_answer("So the answer is 3.5, I think") == "3.5, I think"
    for hedge in ("The answer isn't 5", "The answer is not 5", "the answer is at most 10"):
        assert rg_verifier.extract_answer(hedge) is None
    assert rg_verifier.extract_answer("Answer: 3. I think the answer is 4") == "3. I think the answer is 4"
    for none in ("Answer:   ", None, 42):
        assert rg_verifier.extract_answer(none) is None


def test_verify_right_wrong_missing_garbage_and_huge(task):
    problem = task.load_problems(split="test")[0]
    gold = problem["answer"]
    completions = [
        f"Answer: {gold}",
        f"Answer: {int(gold) + 1}",
        "I do not know.",
        "\x00\ufffd" * 50 + "Answer: \x00{]}",
        None,
        "Answer: " + "9" * (rg_verifier.MAX_ANSWER_CHARS + 1),
    ]
    verdicts = task.verify([problem] * len(completions), completions)
    assert [v["status"] for v in verdicts] == [
        "correct",
        "wrong",
        "unparseable",
        "wrong",
        "unparseable",
        "too_long",
    ]
    assert [v["reward"] for v in verdicts] == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert verdicts[0]["answer"] == gold and verdicts[1]["answer"] == str(int(gold) + 1)
    assert all(v["steps_valid"] is None for v in verdicts)
    assert all(set(v) == {"reward", "status", "detail", "answer", "steps_valid"} for v in verdicts)
    with pytest.raises(ValueError, match="only supports strictness='answer'"):
        task.verify([problem], ["Answer: 1"], strictness="steps")


def test_the_threshold_turns_partial_credit_into_reward():
    import reasoning_gym

    entry = reasoning_gym.create_dataset("caesar_cipher", seed=0, size=1)[0]
    padded = f"{entry['answer']}!"  # the default scorer: len(gold) / len(answer)
    score = reasoning_gym.create_dataset("caesar_cipher", seed=0, size=1).score_answer(padded, entry)
    assert 0.5 < score < 1.0
    strict, lenient = (
        rg_verifier.verify_batch([f"Answer: {padded}"], [entry], dataset="caesar_cipher", threshold=t)[0]
        for t in (1.0, 0.5)
    )
    assert (strict["status"], strict["reward"]) == ("wrong", 0.0)
    assert (lenient["status"], lenient["reward"]) == ("correct", 1.0)


def test_a_score_answer_that_raises_or_hangs_does_not_stop_the_stage():
    import reasoning_gym

    entry = reasoning_gym.create_dataset("countdown", seed=1, size=1)[0]
    with rg_verifier.make_pool(timeout=3.0, workers=1) as pool:
        verdicts = rg_verifier.verify_batch(
            ["Answer: 9**9**9**9", f"Answer: {entry['answer']}"],  # countdown's scorer hangs on the first
            [entry, entry],
            dataset="countdown",
            timeout=3.0,
            pool=pool,
        )
        broken = rg_verifier.verify_batch(["Answer: 1"], [{"question": "q"}], dataset="chain_sum", pool=pool)
    assert (verdicts[0]["status"], verdicts[0]["reward"]) == ("timeout", 0.0)
    assert "exceeded 3 s" in verdicts[0]["detail"]
    assert verdicts[1]["status"] == "correct"  # the worker was replaced; the next sample is judged
    assert broken[0]["status"] == "error" and "KeyError" in broken[0]["detail"]


def test_answer_classes_put_every_correct_answer_in_class_0(task):
    problem = task.load_problems(split="test")[0]
    gold = problem["answer"]
    classes = task.answer_classes([problem], [[gold, f"{gold}.0", "x", None, "x", "y"]])
    assert classes == [[0, 0, 1, None, 1, 2]]  # chain_sum's scorer accepts "5.0" for 5


def test_a_problem_that_was_not_generated_is_refused(task):
    with pytest.raises(ValueError, match="not among task 'chain_sum'"):
        task.verify([{"problem_id": "chain_sum-train-99999", "question": "?"}], ["Answer: 1"])


# ---- config errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "task.dataset=chain_summ",
            r"task.dataset='chain_summ' is not a reasoning-gym dataset; e.g. chain_sum",
        ),
        (
            "task.dataset=nope",
            r"task.dataset='nope' is not a reasoning-gym dataset; e.g. chain_sum, basic_arithmetic, .*\(\d+ in all",
        ),
        ("task.dataset_config={bogus: 1}", r"task.dataset_config for 'chain_sum':.*'bogus'"),
        (
            "task.dataset_config={min_terms: 0}",
            r"task.dataset_config for 'chain_sum': min_terms must be positive",
        ),
        ("task.dataset_config={seed: 3}", r"task.dataset_config.seed is set by the task"),
        ("task.dataset_config=[1]", r"task.dataset_config must be a mapping"),
        ("task.threshold=0", r"task.threshold must be in \(0, 1\]"),
        ("task.num_train=0", r"task.num_train must be >= 1"),
        ("task.num_test=-1", r"task.num_test must be >= 0"),
        ("task.prompt_style=fewshot", r"task.prompt_style='fewshot'; allowed for reasoning_gym: plain, chat"),
        ("task.strictness=steps", r"task.strictness='steps'; allowed for reasoning_gym: answer"),
        ("task.verifier_workers=0", r"task.verifier_workers must be >= 1"),
        ("snapshot.label=majority", r"snapshot.label=majority needs a task that groups answers"),
    ],
)
def test_bad_config_fails_naming_the_key(override, message):
    with pytest.raises(ValueError, match=rf"^config error: {message}"):
        compose(["task=reasoning_gym", override])


def test_decontamination_is_off_by_default():
    """The splits are disjoint by question text, and many datasets share a long instruction in every
    question (leg_counting's is 18 words), which the 13-gram check would match in every test question."""
    assert compose(["task=reasoning_gym"]).snapshot.decontaminate is False


def test_missing_package_says_how_to_install_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "reasoning_gym" else real(name, *a)
    )
    with pytest.raises(ValueError, match=r"needs reasoning-gym: pip install -e '\.\[reasoning-gym\]'"):
        compose(["task=reasoning_gym"])


# ---- the CLI end to end --------------------------------------------------------------------------------


@pytest.mark.slow
def test_restem_runs_the_tiny_reasoning_gym_recipe_end_to_end(tmp_path):
    """``restem experiment=reasoning_gym_tiny``, shrunk: every stage runs on real samples (the snapshot
    is not empty), and the run dir holds the summary and the report."""
    run_dir = tmp_path / "run"
    overrides = [
        f"paths.run_dir={run_dir}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "experiment=reasoning_gym_tiny",
        "task.num_human=200",
        "task.num_train=24",
        "task.num_validation=10",
        "task.num_test=16",
        "model.tiny.hidden_size=64",
        "model.tiny.num_layers=2",
        "model.tiny.num_heads=2",
        "model.tiny.intermediate_size=128",
        "model.pretrain.max_steps=150",
        "trainer.max_steps=20",
        "trainer.warmup_steps=5",
        "trainer.progress_bar=false",
        "sampler.num_samples=4",
        "eval.num_samples=4",
        "loop.iterations=1",
        "loop.sft_baseline=false",
    ]
    done = subprocess.run(
        [sys.executable, "-c", "from factory.loop import main; main()", *overrides],
        cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [row["iteration"] for row in summary] == [0, 1]
    assert summary[1]["num_kept"] > 0  # some samples were judged correct by score_answer
    assert all(0.0 <= row["greedy_accuracy"] <= 1.0 for row in summary)
    report = (run_dir / "report.md").read_text()
    assert "| iteration |" in report and "chain_sum-train-" in report  # the verifier audit's examples
    assert "| task | reasoning_gym |" in (run_dir / "iter_1" / "dataset" / "README.md").read_text()
