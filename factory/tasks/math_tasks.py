"""GSM8K, Hendrycks MATH and MATH-500 as tasks: problems from JSONL files (or the Hub), prompts, verifier.

Splits: ``human`` is the head of the training pool (its human solutions pretrain the tiny base model and
make the SFT baseline), ``train`` the next problems (answers only are used by ReST-EM), ``validation``
the tail of the pool and ``test`` the benchmark's own test set. The pool keeps file order (or a seeded
shuffle), so problem ids and splits are the same on every run.
"""

from __future__ import annotations

from omegaconf import DictConfig

from factory.tasks.loading import (
    answer_strictness,
    config_fingerprint,
    load_hub,
    prepare_pool,
    read_jsonl,
    resolve_data_dir,
    select_split,
    to_problems,
)
from factory.verifiers.math import answer_classes, group_answers, make_pool, verify_batch

PROMPT_STYLES = ("plain", "fewshot", "chat")
SOURCES = ("local", "hub")
# The config items that shape the human split and its prompts, i.e. the tiny base model's corpus.
_FINGERPRINT_KEYS = (
    "name",
    "source",
    "hub_name",
    "hub_config",
    "hub_pool_name",
    "hub_pool_config",
    "seed",
    "shuffle",
    "num_human",
    "max_chars",
    "prompt_style",
    "num_shots",
)


def plain_prompt(question: str) -> str:
    """The plain prompt, also the layout of each few-shot example."""
    return f"Question: {question}\nAnswer: "


class _BenchmarkTask:
    """Shared behaviour; subclasses say where the pool and the test set come from."""

    name = ""
    data_subdir = ""  # folder under paths.data_dir holding train.jsonl and test.jsonl
    kind = "math"  # how raw rows become problems: "gsm8k" or "math"
    instruction = "Solve the problem step by step and put your final answer within \\boxed{}."

    def __init__(self, cfg: DictConfig, *, data_dir: str | None = None):
        self.cfg = cfg
        self.data_dir = resolve_data_dir(data_dir)
        if cfg.source not in SOURCES:
            raise ValueError(f"task.source must be one of {SOURCES}, got {cfg.source!r}")
        if cfg.prompt_style not in PROMPT_STYLES:
            raise ValueError(f"task.prompt_style must be one of {PROMPT_STYLES}, got {cfg.prompt_style!r}")
        if cfg.prompt_style == "fewshot" and not 0 < int(cfg.num_shots) < int(cfg.num_human):
            # The shots come from the human split; one spare keeps a human problem out of its own shots.
            raise ValueError(
                f"task.prompt_style=fewshot needs 0 < task.num_shots < task.num_human, "
                f"got num_shots={cfg.num_shots}, num_human={cfg.num_human}"
            )
        self._pool: list[dict] | None = None
        self._test: list[dict] | None = None
        self._verifier = None

    def _pool_and_test(self) -> tuple[list[dict], list[dict]]:
        """The training pool and the test set: ``<data_subdir>/{train,test}.jsonl`` or the Hub's splits."""
        hub = (self.cfg.hub_name, self.cfg.hub_config)
        return (
            self._rows(f"{self.data_subdir}/train.jsonl", hub=hub, split="train"),
            self._rows(f"{self.data_subdir}/test.jsonl", hub=hub, split="test"),
        )

    def _rows(self, relative: str, *, hub: tuple, split: str) -> list[dict]:
        """Problems of one file (local) or one Hub split (hub)."""
        if self.cfg.source == "hub":
            name, config = hub
            if config is not None and not isinstance(config, str):
                config = list(config)  # a ListConfig of subject configs
            if not name:
                raise ValueError(f"task {self.name!r}: task.source=hub needs a Hub dataset name")
            rows = load_hub(name, config, split)
        else:
            rows = read_jsonl(self.data_dir / relative)
        return to_problems(rows, kind=self.kind, split=split)

    def _load(self) -> tuple[list[dict], list[dict]]:
        if self._pool is None:
            pool, test = self._pool_and_test()
            self._pool, self._test = prepare_pool(pool, self.cfg, task_name=self.name), test
        return self._pool, self._test

    def load_problems(self, *, split: str, limit: int | None = None) -> list[dict]:
        """Problems of one split (``human`` carries solutions); the same on every run."""
        pool, test = self._load()
        problems = select_split(pool, test, split=split, cfg=self.cfg)
        return problems[:limit] if limit is not None else problems

    def format_prompt(self, problem: dict, *, tokenizer=None) -> str:
        """The prompt for ``task.prompt_style``: plain, few-shot (human solutions) or chat template.

        Raises:
            ValueError: For ``chat`` without a tokenizer that has a chat template.
        """
        style = self.cfg.prompt_style
        if style == "plain":
            return plain_prompt(problem["question"])
        if style == "fewshot":
            shots = [plain_prompt(s["question"]) + s["solution"] for s in self._shots(problem)]
            return "\n\n".join([*shots, plain_prompt(problem["question"])])
        if style == "chat":
            if tokenizer is None or not getattr(tokenizer, "chat_template", None):
                raise ValueError(
                    f"task.prompt_style=chat needs a tokenizer with a chat template (got "
                    f"{'none' if tokenizer is None else type(tokenizer).__name__ + ' without one'}); "
                    "use prompt_style=plain or fewshot for the tiny local model"
                )
            message = {"role": "user", "content": f"{problem['question']}\n\n{self.instruction}"}
            return tokenizer.apply_chat_template([message], tokenize=False, add_generation_prompt=True)
        raise ValueError(f"task.prompt_style must be one of {PROMPT_STYLES}, got {style!r}")

    def stop_strings(self) -> list[str]:
        """Where a completion ends besides EOS. Plain and few-shot prompts are ``Question: ... Answer: ``
        blocks joined by blank lines, so a model that goes on after its answer writes a blank line and the
        next ``Question:``: they stop at a new line starting ``Question:`` (which also covers a single
        newline). Chat prompts end at the template's end-of-turn token."""
        return [] if self.cfg.prompt_style == "chat" else ["\nQuestion:"]

    def _shots(self, problem: dict) -> list[dict]:
        """The first ``num_shots`` human problems, skipping the one being asked."""
        pool, _ = self._load()
        n = int(self.cfg.num_shots)
        candidates = pool[: n + 1]
        return [
            s
            for s in candidates
            if s["problem_id"] != problem["problem_id"] and s["question"] != problem["question"]
        ][:n]

    def verify(
        self, problems: list[dict], completions: list[str], *, strictness: str | None = None
    ) -> list[dict]:
        """Verdicts (reward, status, detail, answer), one per completion; outcome-only (the paper's reward).

        The verifier's worker pool starts on the first call and is reused until :meth:`close`.
        """
        answer_strictness(self, strictness)
        golds = [p["answer"] for p in problems]
        return verify_batch(
            completions, golds, timeout=float(self.cfg.verifier_timeout), pool=self._verifier_pool()
        )

    def answer_classes(self, problems: list[dict], answers: list[list[str | None]]) -> list[list[int | None]]:
        """Per problem, the math-verify equivalence class of each sampled answer (for maj@k).

        Class 0 is the gold's class (exactly the answers :meth:`verify` judges correct); equivalent wrong
        answers share an id; None stays None. Runs in the verifier's worker pool.
        """
        golds = [p["answer"] for p in problems]
        return answer_classes(
            golds, answers, timeout=float(self.cfg.verifier_timeout), pool=self._verifier_pool()
        )

    def group_answers(self, answers: list[list[str | None]]) -> list[list[int | None]]:
        """Per problem, the math-verify equivalence class of each sampled answer with no gold at all
        (majority-vote labels); None stays None. Runs in the verifier's worker pool."""
        return group_answers(answers, timeout=float(self.cfg.verifier_timeout), pool=self._verifier_pool())

    def _verifier_pool(self):
        """The verifier's worker pool, started on first use and reused until :meth:`close`."""
        if self._verifier is None:
            self._verifier = make_pool(
                timeout=float(self.cfg.verifier_timeout), workers=int(self.cfg.verifier_workers)
            )
        return self._verifier

    def human_data_fingerprint(self) -> dict:
        """The config items that determine the human split and its prompts (key of the cached base model)."""
        return config_fingerprint(self.cfg, _FINGERPRINT_KEYS)

    def close(self) -> None:
        """Shut the verifier's worker processes down (a later verify starts new ones)."""
        if self._verifier is not None:
            self._verifier.close()
            self._verifier = None


class GSM8KTask(_BenchmarkTask):
    """GSM8K: grade-school word problems with a numeric answer (train 7,473 / test 1,319)."""

    name = "gsm8k"
    data_subdir = "gsm8k"
    kind = "gsm8k"
    instruction = (
        'Solve the problem step by step and end with "The answer is N." where N is the final number.'
    )


class MATHTask(_BenchmarkTask):
    """Hendrycks MATH: competition problems with a boxed answer (train 7,500 / test 5,000)."""

    name = "math"
    data_subdir = "math"


class MATH500Task(_BenchmarkTask):
    """MATH-500 test; training pool = all of MATH (train + test) minus the 500 (PRM800K's split)."""

    name = "math500"

    def _pool_and_test(self) -> tuple[list[dict], list[dict]]:
        test = self._rows(
            "prm800k_math_splits/test.jsonl", hub=(self.cfg.hub_name, self.cfg.hub_config), split="test"
        )
        pool_hub = (self.cfg.hub_pool_name, self.cfg.hub_pool_config)
        pool = self._rows("math/train.jsonl", hub=pool_hub, split="train") + self._rows(
            "math/test.jsonl", hub=pool_hub, split="test"
        )
        # By id, and by text for Hub copies of MATH that carry no unique_id.
        ids = {p["problem_id"] for p in test}
        questions = {p["question"].strip() for p in test}
        return [
            p for p in pool if p["problem_id"] not in ids and p["question"].strip() not in questions
        ], test
