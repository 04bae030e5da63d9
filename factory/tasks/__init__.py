"""Tasks: where problems come from, how they are prompted, and which verifier judges a completion."""

from __future__ import annotations

from functools import cache

from omegaconf import DictConfig

from factory.tasks import arith
from factory.verifiers import arith as arith_verifier


class ArithTask:
    """The embedded default: generated multi-step arithmetic word problems (no data files needed)."""

    name = "arith"

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    def load_problems(self, *, split: str, limit: int | None = None) -> list[dict]:
        """Problems of one split (``human`` carries step-by-step solutions); deterministic per seed."""
        problems = _arith_split(
            split=split,
            num_problems=int(self.cfg[f"num_{split}"]),
            seed=int(self.cfg.seed),
            min_steps=int(self.cfg.human_min_steps if split == "human" else self.cfg.min_steps),
            max_steps=int(self.cfg.human_max_steps if split == "human" else self.cfg.max_steps),
            max_operand=int(self.cfg.max_operand),
            max_value=int(self.cfg.max_value),
        )
        return problems[:limit] if limit is not None else problems

    def format_prompt(self, problem: dict) -> str:
        return arith.format_prompt(problem)

    def verify(
        self, problems: list[dict], completions: list[str], *, strictness: str | None = None
    ) -> list[dict]:
        """Verdicts (reward, status, detail, answer, steps_valid), one per completion, same order."""
        return arith_verifier.verify_batch(
            completions, [p["answer"] for p in problems], strictness=strictness or self.cfg.strictness
        )


@cache
def _arith_split(**kwargs) -> list[dict]:
    # Generating 2,000 problems takes a moment and every stage asks for them: cache per knob set.
    return arith.generate_split(**kwargs)


TASKS = {"arith": ArithTask}


def build_task(cfg: DictConfig):
    """Builds the task named by ``cfg.name``; unknown names are a clear error."""
    if cfg.name not in TASKS:
        raise ValueError(f"unknown task {cfg.name!r}; available: {', '.join(sorted(TASKS))}")
    return TASKS[cfg.name](cfg)
