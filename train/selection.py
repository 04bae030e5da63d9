"""Model selection during a fit: score the model every few steps, keep the best weights, stop at a plateau.

Base pretraining of the tiny model (``model.pretrain.select``) uses it so that the base is "trained until validation accuracy stops
improving" rather than for a fixed number of steps: a fixed count lands at a different point of the
curve on each CPU kind (different matmul kernels, amplified over thousands of steps), a plateau does not.
The M-steps and the SFT baseline use it with ``trainer.select`` (``train.m_step.train_from_base``): both
are scored on the same validation problems with the same rule, so the comparison stays fair.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import lightning as L
import torch

log = logging.getLogger(__name__)


class BestOnValidation(L.Callback):
    """Every ``every`` optimizer steps, scores the model with ``score_fn(model) -> float`` (higher is
    better), keeps a copy of the best weights, stops the fit after ``patience`` scores without an
    improvement of more than ``min_delta``, and loads the best weights back into the model when the fit
    ends. Steps before ``min_steps`` are not scored (the last step always is). The score history, the
    best score and its step go into :attr:`summary`.

    The state (history, best weights) is saved in Lightning checkpoints, so a resumed fit selects exactly
    as an uninterrupted one does.
    """

    def __init__(
        self,
        score_fn: Callable[[torch.nn.Module], float],
        *,
        every: int,
        patience: int,
        min_delta: float = 0.0,
        min_steps: int = 0,
    ):
        if every < 1 or patience < 1:
            raise ValueError(f"every and patience must be >= 1, got every={every}, patience={patience}")
        self.score_fn = score_fn
        self.every = every
        self.patience = patience
        self.min_delta = min_delta
        self.min_steps = min_steps
        self.history: list[tuple[int, float]] = []
        self.best_score: float | None = None
        self.best_step: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.bad = 0

    @classmethod
    def from_settings(cls, score_fn: Callable[[torch.nn.Module], float], select) -> BestOnValidation:
        """The callback of a ``select`` config group (``trainer.select``, ``model.pretrain.select``)."""
        return cls(
            score_fn, every=int(select.every), patience=int(select.patience), min_steps=int(select.min_steps)
        )

    def _score(self, trainer: L.Trainer, model: torch.nn.Module) -> None:
        step = trainer.global_step
        if self.history and self.history[-1][0] == step:
            return
        was_training = model.training
        model.eval()
        score = float(self.score_fn(model))
        model.train(was_training)
        self.history.append((step, score))
        if self.best_score is None or score > self.best_score + self.min_delta:
            self.best_score, self.best_step, self.bad = score, step, 0
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.bad += 1
            if self.bad >= self.patience:
                trainer.should_stop = True
        log.info(
            "step %d: validation score %.4f (best %.4f at step %d)",
            step,
            score,
            self.best_score,
            self.best_step,
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # global_step counts optimizer steps: score once per step, after its last accumulation round.
        if trainer.global_step < self.min_steps:
            return  # an early checkpoint can score a noisy peak (a lucky frequent answer) and stop the fit
        if trainer.global_step % self.every == 0 and (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self._score(trainer, pl_module.model)

    def on_train_end(self, trainer, pl_module) -> None:
        self._score(trainer, pl_module.model)  # the last step counts too
        if self.best_state is not None:
            pl_module.model.load_state_dict(self.best_state)

    @property
    def summary(self) -> dict:
        """What was selected: best score and step, steps trained, and every score."""
        return {
            "best_score": self.best_score,
            "best_step": self.best_step,
            "steps_trained": self.history[-1][0] if self.history else 0,
            "history": [[step, round(score, 5)] for step, score in self.history],
        }

    def state_dict(self) -> dict:
        return {
            "history": self.history,
            "best_score": self.best_score,
            "best_step": self.best_step,
            "best_state": self.best_state,
            "bad": self.bad,
        }

    def load_state_dict(self, state: dict) -> None:
        self.history = [tuple(x) for x in state["history"]]
        self.best_score, self.best_step = state["best_score"], state["best_step"]
        self.best_state, self.bad = state["best_state"], state["bad"]


def greedy_accuracy(task, problems: list[dict], tokenizer, cfg):
    """A score function for :class:`BestOnValidation`: the share of ``problems`` a model answers right with
    greedy decoding, generated as the evaluation generates (``eval.max_new_tokens``, the task's and the
    sampler's stop strings) and judged on the final answer."""
    from factory.judge import judge
    from factory.sampling.completions import merge_stops, task_stop_strings
    from factory.sampling.hf import generate

    prompts = [task.format_prompt(p, tokenizer=tokenizer) for p in problems]
    stop = merge_stops(task_stop_strings(task), cfg.sampler.get("stop"))

    def score(model) -> float:
        outputs = generate(
            model,
            tokenizer,
            prompts,
            num_samples=1,
            temperature=0.0,
            max_new_tokens=int(cfg.eval.max_new_tokens),
            batch_size=int(cfg.eval.batch_size) * int(cfg.eval.num_samples),
            stop=stop,
            progress=False,
        )
        # The evaluation's guarded judge: a runaway or non-UTF-8 completion is wrong, not a crash.
        verdicts = judge(task, problems, [o[0]["completion"] for o in outputs], strictness="answer")
        return sum(v["reward"] > 0 for v in verdicts) / len(verdicts)

    return score


def validation_problems(task, num_problems: int) -> list[dict]:
    """The first ``num_problems`` problems of the task's validation split (what selection scores on)."""
    return task.load_problems(split="validation", limit=int(num_problems))
