"""Tests for the seeded arithmetic word-problem generator (factory.tasks.arith)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from factory.tasks.arith import (
    CHAT_INSTRUCTION,
    SPLITS,
    chat_solution,
    format_prompt,
    generate_split,
    split_of_computation,
)
from factory.verifiers.arith import check_equations, verify_batch

KNOBS = dict(min_steps=1, max_steps=4, max_operand=9, max_value=99)
EQUATION = re.compile(r"^(\d+)([+\-*])(\d+)=(\d+)$")


def _gen(split="train", num_problems=200, seed=0, **overrides):
    knobs = {**KNOBS, **overrides}
    return generate_split(split=split, num_problems=num_problems, seed=seed, **knobs)


def test_problem_shape_and_ids():
    problems = _gen(split="human", num_problems=50)
    assert len(problems) == 50
    for i, p in enumerate(problems):
        assert set(p) == {"problem_id", "split", "question", "answer", "solution", "num_steps", "computation"}
        assert p["problem_id"] == f"arith-human-{i:05d}"
        assert p["split"] == "human"
        assert p["answer"] == str(int(p["answer"]))
        assert p["solution"].endswith(f"Answer: {p['answer']}")
        assert not p["solution"].endswith("\n")
        assert p["question"].endswith("have now?")
        assert len(p["computation"].split("|")) == p["num_steps"] + 1


def test_deterministic_for_same_seed():
    assert _gen(seed=7) == _gen(seed=7)


def test_different_seed_gives_different_problems():
    a = [p["question"] for p in _gen(seed=1)]
    b = [p["question"] for p in _gen(seed=2)]
    assert a != b
    assert len(set(a) & set(b)) < len(a) // 2


def test_zero_problems():
    assert _gen(num_problems=0) == []


def test_human_solutions_pass_strict_verifier():
    problems = _gen(split="human", num_problems=300)
    verdicts = verify_batch(
        [p["solution"] for p in problems], [p["answer"] for p in problems], strictness="steps"
    )
    assert all(v["status"] == "correct" and v["reward"] == 1.0 and v["steps_valid"] for v in verdicts)
    for p in problems:
        assert check_equations(p["solution"]) == (p["num_steps"], p["num_steps"])


def test_solution_equations_chain_and_stay_in_bounds():
    max_operand, max_value = 9, 50
    for p in _gen(split="train", num_problems=300, max_operand=max_operand, max_value=max_value):
        body, answer = p["solution"].split(" Answer: ")
        assert answer == p["answer"]
        steps = body.split(" ")
        assert len(steps) == p["num_steps"]
        parts = p["computation"].split("|")
        running = int(parts[0])
        assert 1 <= running <= max_operand
        assert p["question"].split(" has ")[1].startswith(f"{running} ")
        for step, op_text in zip(steps, parts[1:], strict=True):
            assert step.endswith(".")
            left, op, right, result = EQUATION.match(step[:-1]).groups()
            assert int(left) == running  # chained on the running value
            assert op_text == f"{op}{right}"
            b = int(right)
            assert 1 <= b <= max_operand
            if op == "*":
                assert b >= 2
            expected = {"+": running + b, "-": running - b, "*": running * b}[op]
            assert int(result) == expected
            assert 0 <= expected <= max_value
            assert str(b) in p["question"]
            running = expected
        assert str(running) == p["answer"]


def test_no_duplicate_questions_within_split():
    questions = [p["question"] for p in _gen(split="validation", num_problems=300)]
    assert len(questions) == len(set(questions))


def test_splits_disjoint_by_computation():
    by_split = {s: {p["computation"] for p in _gen(split=s, num_problems=300)} for s in SPLITS}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            assert not by_split[a] & by_split[b], (a, b)
        assert all(split_of_computation(c) == a for c in by_split[a])


def test_splits_disjoint_with_different_step_knobs():
    human = {p["computation"] for p in _gen(split="human", num_problems=200, min_steps=1, max_steps=2)}
    test = {p["computation"] for p in _gen(split="test", num_problems=200, min_steps=1, max_steps=4)}
    assert not human & test


def test_step_counts_respect_knobs():
    human = _gen(split="human", num_problems=200, min_steps=1, max_steps=2)
    assert {p["num_steps"] for p in human} == {1, 2}
    test = _gen(split="test", num_problems=300, min_steps=1, max_steps=4)
    assert {p["num_steps"] for p in test} == {1, 2, 3, 4}
    exact = _gen(split="train", num_problems=50, min_steps=3, max_steps=3)
    assert all(p["num_steps"] == 3 for p in exact)


def test_format_prompt():
    p = _gen(num_problems=1)[0]
    assert format_prompt(p) == f"Q: {p['question']}\nA: "


def test_impossible_request_raises_clear_error():
    with pytest.raises(ValueError, match="max_operand=1"):
        _gen(num_problems=100, min_steps=1, max_steps=1, max_operand=1, max_value=1)


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ({"split": "dev"}, "split"),
        ({"num_problems": -1}, "num_problems"),
        ({"min_steps": 0}, "min_steps"),
        ({"min_steps": 3, "max_steps": 2}, "max_steps"),
        ({"max_operand": 0}, "max_operand"),
        ({"max_operand": 10, "max_value": 9}, "max_value"),
    ],
)
def test_bad_arguments_raise(overrides, name):
    with pytest.raises(ValueError, match=name):
        _gen(**overrides)


def test_arguments_are_keyword_only():
    with pytest.raises(TypeError):
        generate_split("train", 10, 0, 1, 4, 9, 99)  # type: ignore[misc]


# --- the chat prompt style (instruct models) ---------------------------------------------------------

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _task(*overrides):
    from factory.config import compose
    from factory.tasks import build_task

    return build_task(compose(["task.num_human=20", "task.num_test=5", *overrides]).task)


def test_chat_solution_form():
    assert chat_solution("3+4=7. 7-2=5. Answer: 5") == "3 + 4 = 7. 7 - 2 = 5. The answer is 5."
    assert chat_solution("2*3=6. Answer: 6") == "2 * 3 = 6. The answer is 6."
    with pytest.raises(ValueError, match="Answer"):
        chat_solution("3 + 4 = 7. The answer is 7.")


def test_chat_style_changes_only_the_solutions_and_they_pass_the_steps_verifier():
    plain, chat = _task(), _task("task.prompt_style=chat")
    plain_human, chat_human = plain.load_problems(split="human"), chat.load_problems(split="human")
    # The tiny model's solutions are untouched; the chat ones are the same problems in free text.
    assert plain_human == _gen_like(plain)
    assert [{**p, "solution": None} for p in plain_human] == [{**p, "solution": None} for p in chat_human]
    assert all(p["solution"].endswith(f"The answer is {p['answer']}.") for p in chat_human)
    verdicts = chat.verify(chat_human, [p["solution"] for p in chat_human], strictness="steps")
    assert all(v["status"] == "correct" and v["steps_valid"] for v in verdicts)
    assert plain.load_problems(split="human")[0]["solution"].endswith(f"Answer: {plain_human[0]['answer']}")


def _gen_like(task):
    cfg = task.cfg
    return generate_split(
        split="human",
        num_problems=int(cfg.num_human),
        seed=int(cfg.seed),
        min_steps=int(cfg.human_min_steps),
        max_steps=int(cfg.human_max_steps),
        max_operand=int(cfg.max_operand),
        max_value=int(cfg.max_value),
    )


def test_chat_prompt_uses_the_tokenizers_template():
    from factory.models import train_char_tokenizer

    task = _task("task.prompt_style=chat")
    problem = task.load_problems(split="test")[0]
    tokenizer = train_char_tokenizer(["abc"])
    tokenizer.chat_template = CHAT_TEMPLATE
    prompt = task.format_prompt(problem, tokenizer=tokenizer)
    assert prompt == f"<|user|>{problem['question']}\n\n{CHAT_INSTRUCTION}\n<|assistant|>"
    assert '"The answer is N."' in CHAT_INSTRUCTION
    with pytest.raises(ValueError, match="prompt_style=chat needs a tokenizer with a chat template"):
        task.format_prompt(problem)
    with pytest.raises(ValueError, match="without one"):
        task.format_prompt(problem, tokenizer=train_char_tokenizer(["abc"]))
    # The plain style ignores the tokenizer.
    assert _task().format_prompt(problem, tokenizer=tokenizer) == format_prompt(problem)


def test_bad_prompt_style_fails_with_the_key():
    from factory.config import compose

    with pytest.raises(ValueError, match=r"task\.prompt_style='fewshot'; allowed for arith: plain, chat"):
        compose(["task.prompt_style=fewshot"])


def test_prompt_style_keys_the_base_model_only_when_it_changes_the_solutions():
    plain = _task().human_data_fingerprint()
    assert "prompt_style" not in plain  # the plain style keeps the keys of cached tiny base models
    assert _task("task.prompt_style=chat").human_data_fingerprint() == {**plain, "prompt_style": "chat"}


SMOLLM2 = Path("/work/models/SmolLM2-135M-Instruct")


@pytest.mark.slow
@pytest.mark.skipif(
    not SMOLLM2.is_dir(), reason=f"{SMOLLM2} is not here (the lead's fetch fixture provides it)"
)
def test_chat_prompt_with_smollm2s_template():
    from factory.models import load_tokenizer

    task = _task("task.prompt_style=chat")
    problem = task.load_problems(split="test")[0]
    prompt = task.format_prompt(problem, tokenizer=load_tokenizer(SMOLLM2))
    assert prompt.startswith("<|im_start|>system\n")  # the template's default system prompt
    assert f"<|im_start|>user\n{problem['question']}\n\n{CHAT_INSTRUCTION}<|im_end|>\n" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
