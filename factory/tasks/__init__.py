"""Tasks: where problems come from, how they are prompted, and which verifier judges a completion."""

from __future__ import annotations

from functools import cache

from omegaconf import DictConfig

from factory.tasks import arith
from factory.tasks.code_tasks import APPSTask, HumanEvalTask, MBPPTask
from factory.tasks.loading import config_fingerprint
from factory.tasks.math_tasks import GSM8KTask, MATH500Task, MATHTask
from factory.tasks.reasoning_gym_task import ReasoningGymTask
from factory.verifiers import arith as arith_verifier

# Task keys that change arith's human seed data; the others (train/test sizes, reward) do not touch p0.
_ARITH_HUMAN_DATA_KEYS = (
    "name",
    "seed",
    "num_human",
    "human_min_steps",
    "human_max_steps",
    "max_operand",
    "max_value",
)


class ArithTask:
    """The embedded default: generated multi-step arithmetic word problems (no data files needed)."""

    name = "arith"

    def __init__(self, cfg: DictConfig, *, data_dir: str | None = None):
        self.cfg = cfg  # data_dir is unused: the problems are generated
        if cfg.prompt_style not in arith.PROMPT_STYLES:
            raise ValueError(
                f"task.prompt_style must be one of {arith.PROMPT_STYLES}, got {cfg.prompt_style!r}"
            )

    def load_problems(self, *, split: str, limit: int | None = None) -> list[dict]:
        """Problems of one split (``human`` carries step-by-step solutions); deterministic per seed.

        With ``prompt_style=chat`` every ``solution`` is in the free-text form of
        :func:`factory.tasks.arith.chat_solution` (``"3 + 4 = 7. The answer is 7."``).
        """
        problems = _arith_split(
            split=split,
            num_problems=int(self.cfg[f"num_{split}"]),
            seed=int(self.cfg.seed),
            min_steps=int(self.cfg.human_min_steps if split == "human" else self.cfg.min_steps),
            max_steps=int(self.cfg.human_max_steps if split == "human" else self.cfg.max_steps),
            max_operand=int(self.cfg.max_operand),
            max_value=int(self.cfg.max_value),
        )
        problems = problems[:limit] if limit is not None else problems
        if self.cfg.prompt_style == "chat":
            # Copies: the cached split is shared by every task object of the same knobs.
            problems = [{**p, "solution": arith.chat_solution(p["solution"])} for p in problems]
        return problems

    def format_prompt(self, problem: dict, *, tokenizer=None) -> str:
        """``plain``: the fixed ``Q: ... A: `` prompt (``tokenizer`` unused); ``chat``: the tokenizer's
        chat template with the question and :data:`factory.tasks.arith.CHAT_INSTRUCTION`.

        Raises:
            ValueError: For ``chat`` without a tokenizer that has a chat template.
        """
        if self.cfg.prompt_style == "chat":
            return arith.format_chat_prompt(problem, tokenizer)
        return arith.format_prompt(problem)

    def stop_strings(self) -> list[str]:
        """Where a completion ends besides EOS: a model that goes on after its answer to a ``Q: ... A: ``
        prompt writes the next question, so plain prompts stop at a new line starting ``Q:``; chat
        prompts end at the template's end-of-turn token."""
        return [] if self.cfg.get("prompt_style", "plain") == "chat" else ["\nQ:"]

    def verify(
        self, problems: list[dict], completions: list[str], *, strictness: str | None = None
    ) -> list[dict]:
        """Verdicts (reward, status, detail, answer, steps_valid), one per completion, same order."""
        return arith_verifier.verify_batch(
            completions, [p["answer"] for p in problems], strictness=strictness or self.cfg.strictness
        )

    def answer_classes(self, problems: list[dict], answers: list[list[str | None]]) -> list[list[int | None]]:
        """Per problem, the class of each sampled answer (for maj@k): 0 when it is the gold integer, else
        one id per distinct integer; None stays None."""
        return arith_verifier.answer_classes([p["answer"] for p in problems], answers)

    def group_answers(self, answers: list[list[str | None]]) -> list[list[int | None]]:
        """Per problem, a class id for each sampled answer with no gold (majority-vote labels): integers
        equal as integers share one; None stays None."""
        return arith_verifier.group_answers(answers)

    def human_data_fingerprint(self) -> dict:
        """The config items that determine the human split (key of the cached tiny base model)."""
        # prompt_style joins the key only when it changes the solutions, so that the cached tiny base
        # models of the plain style (all of them so far) keep their keys.
        keys = _ARITH_HUMAN_DATA_KEYS + (("prompt_style",) if self.cfg.prompt_style != "plain" else ())
        return config_fingerprint(self.cfg, keys)

    def close(self) -> None:
        """Nothing to release: the arith verifier runs in-process."""


@cache
def _arith_split(**kwargs) -> list[dict]:
    # Generating 2,000 problems takes a moment and every stage asks for them: cache per knob set.
    return arith.generate_split(**kwargs)


TASKS = {
    "arith": ArithTask,
    "gsm8k": GSM8KTask,
    "math": MATHTask,
    "math500": MATH500Task,
    "humaneval": HumanEvalTask,
    "mbpp": MBPPTask,
    "apps": APPSTask,
    "reasoning_gym": ReasoningGymTask,
}


def build_task(cfg: DictConfig, *, data_dir: str | None = None):
    """Builds the task named by ``cfg.name``; unknown names are a clear error.

    Args:
        cfg: The task config (``cfg.task``).
        data_dir: Folder of the benchmark files (``cfg.paths.data_dir``); None: ``$RESTEM_DATA_DIR``,
            else ``../shared/datasets``. Unused by arith.
    """
    if cfg.name not in TASKS:
        raise ValueError(f"unknown task {cfg.name!r}; available: {', '.join(sorted(TASKS))}")
    return TASKS[cfg.name](cfg, data_dir=data_dir)
