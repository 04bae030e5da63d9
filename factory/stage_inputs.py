"""What each stage of a run is made from, and the check that never reuses a stage made from other inputs.

Every finished stage records its inputs in its ``stage.json`` (``rundir.mark_done``): ``config`` holds the
config keys it reads, under their config names, and ``data`` fingerprints of what else it reads (weights,
problems, rendered prompts, training pairs). A rerun computes the same inputs from its own config; a
finished stage whose recorded inputs differ is refused naming the changed keys (``check_stage``),
never reused or overwritten. docs/run_directory.md has the table and the reasons for each choice.

    stage     config                                               data
    samples   sampler.* but throughput keys; model.dtype           policy weights, problems, rendered
                                                                   prompts, policy draw
    verdicts  task.* verifier settings                             the samples' recorded inputs
    dataset   its version (versioning.snapshot_inputs, manifest.json), with the evaluation texts it is
              decontaminated against
    model     trainer.* but placement/speed keys (the global       base model weights, training data
              batch instead); model.dtype; loop.include_human_data
    eval      eval.* but batch_size; sampler.* keys generation      model weights, problems, rendered
              reads; task.* verifier settings; model.dtype          prompts
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from factory.rundir import NEW_RUN_DIR, STAGE_FILE, RunDir, StaleStageError, digest, read_json
from factory.versioning import (
    SAMPLER_THROUGHPUT_KEYS,
    TASK_THROUGHPUT_KEYS,
    check_snapshot_version,
    problems_fingerprint,
    rendered_prompts_fingerprint,
    snapshot_identity,
    weights_fingerprint,
)

ITERATION_STAGES = ("samples", "verdicts", "dataset", "model", "eval")
# Trainer keys that change where and how fast the M-step runs, or what it shows, not the model it makes;
# every other key counts, including ones added later. The samples per optimizer step are recorded as
# trainer.global_batch_size (null resolved to batch_size x devices x nodes), so the micro-batch and the
# device count only split that batch over hardware (the step stream does not depend on them:
# tests/test_train_scale.py). packing, loss_chunk_size, compile and gradient_checkpointing do count:
# they compute the same loss with other kernels, equal to ~1e-5 but not bit for bit, and a reused stage
# must be what the config computes (the tiny base model's cache key counts them too).
TRAINER_THROUGHPUT_KEYS = (
    "accelerator",
    "devices",
    "num_nodes",
    "strategy",
    "batch_size",
    "progress_bar",
    "checkpoint_every_n_steps",
)
EVAL_THROUGHPUT_KEYS = ("batch_size",)
# Sampler keys only the E-step reads: evaluation has its own num_samples, temperature, top_p and
# max_new_tokens, and seeds every request itself.
E_STEP_ONLY_SAMPLER_KEYS = ("num_samples", "temperature", "top_k", "top_p", "max_new_tokens", "seed")
# Task keys that choose the problems or shape the prompts: the problems and rendered-prompts fingerprints
# carry their effect. The other task keys (name, strictness, timeouts, limits, keys added later) are what
# the verifier reads.
TASK_DATA_KEYS = (
    "seed",
    "source",
    "hub_name",
    "hub_config",
    "hub_pool_name",
    "hub_pool_config",
    "variant",
    "train_file",
    "test_file",
    "shuffle",
    "num_human",
    "num_train",
    "train_start",
    "num_validation",
    "num_test",
    "max_chars",
    "min_steps",
    "max_steps",
    "human_min_steps",
    "human_max_steps",
    "max_operand",
    "max_value",
    "prompt_style",
    "num_shots",
)
# Config keys the hint about config.yaml leaves out: where the run lives, and the stage commands' argument.
_NOT_HINTED = ("paths.", "iteration", "logger.", "cluster.")  # in no stage's inputs
_MAX_HINTED = 8


def _without(settings: DictConfig, drop: tuple[str, ...]) -> dict:
    values = OmegaConf.to_container(settings, resolve=True)
    return {k: v for k, v in values.items() if k not in drop}


def trainer_settings(cfg: DictConfig) -> dict:
    """The trainer keys that change the weights an M-step makes (``TRAINER_THROUGHPUT_KEYS`` left out)."""
    values = OmegaConf.to_container(cfg.trainer, resolve=True)
    if values.get("global_batch_size") is None:
        from train.strategy import num_processes

        values["global_batch_size"] = int(cfg.trainer.batch_size) * num_processes(cfg.trainer)
    return {k: v for k, v in values.items() if k not in TRAINER_THROUGHPUT_KEYS}


def verifier_settings(cfg: DictConfig, *, for_eval: bool = False) -> dict:
    """The task keys the verifier reads; evaluation always judges final answers, so not strictness."""
    drop = TASK_THROUGHPUT_KEYS + TASK_DATA_KEYS + (("strictness",) if for_eval else ())
    return _without(cfg.task, drop)


def eval_sampler_settings(cfg: DictConfig) -> dict:
    """The sampler keys evaluation's generation reads (backend, stop strings, engine settings)."""
    return _without(cfg.sampler, SAMPLER_THROUGHPUT_KEYS + E_STEP_ONLY_SAMPLER_KEYS)


def verdicts_inputs(cfg: DictConfig, samples_dir) -> dict:
    """The verdicts' inputs: the verifier settings and the fingerprint the samples recorded (None for
    samples that record none, e.g. written by hand: the verify command still judges them)."""
    info = read_json(samples_dir / STAGE_FILE) if (samples_dir / STAGE_FILE).is_file() else {}
    return {
        "config": {"task": verifier_settings(cfg)},
        "data": {"samples": info.get("inputs_sha256")},
    }


class StageInputs:
    """The inputs every stage of one run dir gets from one config, computed when asked and memoized per
    process; weights fingerprints are cached by file stamps, so a rerun hashes no weights again.

    Args:
        cfg: the run's config.
        task: the built task (``factory.tasks.build_task``).
        run_dir: the run directory.
    """

    def __init__(self, cfg: DictConfig, *, task, run_dir: RunDir):
        self.cfg, self.task, self.run_dir = cfg, task, run_dir
        self._prompts: dict[tuple[str, str], str] = {}
        self._pairs: dict[int | str, str] = {}
        self._plans: dict[int, tuple[list[dict], dict[str, int] | None]] = {}

    @cached_property
    def base(self):
        """The base model's folder or Hub name, built on first use (``ensure_base_model``)."""
        from factory.base_model import ensure_base_model

        return ensure_base_model(self.cfg)

    @cached_property
    def train_problems(self) -> list[dict]:
        return self.task.load_problems(split="train")

    @cached_property
    def eval_problems(self) -> list[dict]:
        return self.task.load_problems(split=self.cfg.eval.split, limit=self.cfg.eval.limit)

    @cached_property
    def _problems_sha(self) -> dict[str, str]:
        return {
            "train": problems_fingerprint(self.train_problems),
            "eval": problems_fingerprint(self.eval_problems),
        }

    def _prompts_sha(self, split: str, model) -> str:
        """The rendered prompts of ``split`` ("train" or "eval") with ``model``'s tokenizer."""
        key = (split, weights_fingerprint(model))
        if key not in self._prompts:
            from factory.models import load_tokenizer

            problems = self.train_problems if split == "train" else self.eval_problems
            self._prompts[key] = rendered_prompts_fingerprint(
                self.task, problems, tokenizer=load_tokenizer(model)
            )
        return self._prompts[key]

    def model_path(self, k: int | str):
        """The model iteration ``k`` evaluates: the base for 0, else its trained model."""
        return self.base if k == 0 else self.run_dir.stage(k, "model")

    def plan(self, k: int) -> tuple[list[dict], dict[str, int] | None]:
        """The problems iteration ``k``'s E-step samples and the samples each gets (None: all problems,
        ``sampler.num_samples`` each; ``factory.curriculum``)."""
        from factory import curriculum

        if not curriculum.is_active(self.cfg):
            return self.train_problems, None
        if k not in self._plans:
            rates = curriculum.latest_pass_rates(self.run_dir, k)
            self._plans[k] = curriculum.plan(self.train_problems, rates, self.cfg)
        return self._plans[k]

    def carried_pairs(self, k: int) -> list[dict]:
        """The latest kept solutions of the problems a curriculum skipped in iteration ``k`` (none without
        one): every M-step trains the base model on one iteration's data (``curriculum.carried_pairs``)."""
        problems, counts = self.plan(k)
        if counts is None:
            return []
        from factory.curriculum import carried_pairs

        return carried_pairs(self.run_dir, k, {p["problem_id"] for p in problems})

    def _plan_sha(self, k: int) -> str:
        """The fingerprint of what ``k`` samples: the training problems, or the curriculum's plan."""
        problems, counts = self.plan(k)
        if counts is None:
            return self._problems_sha["train"]
        return digest({"problems": problems_fingerprint(problems), "samples per problem": counts})

    def sampling(self, k: int) -> dict:
        """Iteration ``k``'s E-step: its policy, the fingerprints its samples depend on, its draw."""

        policy = policy_path(self.run_dir, self.base, k)
        return {
            "policy": policy,
            "policy_fingerprint": weights_fingerprint(policy),
            "problems_sha": self._plan_sha(k),
            "prompts_sha": self._prompts_sha("train", policy),
            "draw": policy_draw(self.run_dir, k),
        }

    def samples(self, k: int) -> dict:
        s = self.sampling(k)
        return {
            "config": {
                "sampler": _without(self.cfg.sampler, SAMPLER_THROUGHPUT_KEYS),
                "model": {"dtype": self.cfg.model.dtype},
            },
            "data": {
                "policy weights": s["policy_fingerprint"],
                "problems": s["problems_sha"],
                "rendered prompts": s["prompts_sha"],
                "policy draw": s["draw"],
            },
        }

    def verdicts(self, k: int) -> dict:
        return verdicts_inputs(self.cfg, self.run_dir.stage(k, "samples"))

    @cached_property
    def eval_texts(self) -> list[dict]:
        """The evaluation texts snapshots are decontaminated against (none when that is off)."""
        from factory.decontaminate import evaluation_texts

        return evaluation_texts(self.task, self.cfg) if self.cfg.snapshot.decontaminate else []

    @cached_property
    def overlap_index(self):
        """The n-gram index of :attr:`eval_texts` (None when ``snapshot.decontaminate`` is off)."""
        from factory.decontaminate import OverlapIndex

        if not self.cfg.snapshot.decontaminate:
            return None
        return OverlapIndex(self.eval_texts, n=int(self.cfg.snapshot.ngram))

    @cached_property
    def _eval_texts_sha(self) -> str | None:
        from factory.decontaminate import texts_fingerprint

        return texts_fingerprint(self.eval_texts) if self.cfg.snapshot.decontaminate else None

    def snapshot(self, k: int) -> dict:
        """Iteration ``k``'s snapshot identity (version, name, inputs: ``versioning.snapshot_identity``)."""
        s = self.sampling(k)
        return snapshot_identity(
            self.cfg,
            policy_fingerprint=s["policy_fingerprint"],
            problems_sha=s["problems_sha"],
            prompts_sha=s["prompts_sha"],
            iteration=k,
            eval_texts_sha=self._eval_texts_sha,
        )

    def training_pairs(self, k: int | str) -> list[dict]:
        """The M-step's prompt/completion pairs: iteration ``k``'s snapshot (plus, with a curriculum, the
        latest solutions of the problems it skipped, and the human seeds with ``loop.include_human_data``),
        or the human seeds alone for ``sft_human``."""
        from factory.base_model import human_pairs
        from factory.models import load_tokenizer

        if k == "sft_human":
            return human_pairs(self.task, tokenizer=load_tokenizer(self.base))
        pairs = snapshot_pairs(self.run_dir.stage(k, "dataset")) + self.carried_pairs(k)
        if self.cfg.loop.include_human_data:
            pairs += human_pairs(self.task, tokenizer=load_tokenizer(self.base))
        return pairs

    def model(self, k: int | str, pairs: list[dict] | None = None) -> dict:
        """The M-step's inputs; ``pairs``: its training pairs when already at hand."""
        if k not in self._pairs:  # a finished snapshot never changes: one hash per process
            self._pairs[k] = digest(pairs if pairs is not None else self.training_pairs(k))
        config = {"trainer": trainer_settings(self.cfg), "model": {"dtype": self.cfg.model.dtype}}
        if self.cfg.trainer.select.every > 0:
            # What trainer.select scores with (train/selection.py): decode length, stops, the problems.
            # The problems train.selection.validation_problems scores on (not imported: train imports us).
            problems = self.task.load_problems(
                split="validation", limit=int(self.cfg.trainer.select.num_problems)
            )
            config["selection"] = {
                "max_new_tokens": int(self.cfg.eval.max_new_tokens),
                "stop": list(self.cfg.sampler.stop),
                "problems": problems_fingerprint(problems),
            }
        if k != "sft_human":
            config["loop"] = {"include_human_data": bool(self.cfg.loop.include_human_data)}
        return {
            "config": config,
            "data": {"base model weights": weights_fingerprint(self.base), "training data": self._pairs[k]},
        }

    def eval(self, k: int | str) -> dict:
        model = self.model_path(k)
        return {
            "config": {
                "eval": _without(self.cfg.eval, EVAL_THROUGHPUT_KEYS),
                "sampler": eval_sampler_settings(self.cfg),
                "task": verifier_settings(self.cfg, for_eval=True),
                "model": {"dtype": self.cfg.model.dtype},
            },
            "data": {
                "model weights": weights_fingerprint(model),
                "problems": self._problems_sha["eval"],
                "rendered prompts": self._prompts_sha("eval", model),
            },
        }

    def is_current(self, k: int | str, name: str) -> bool:
        """Whether stage ``name`` of ``k`` is finished (and made from this config's inputs).

        Returns:
            False when it is not finished (nothing is computed), True when it is and its inputs match.

        Raises:
            StaleStageError: when it is finished from other inputs.
        """
        if not self.run_dir.is_done(k, name):
            return False
        if name == "dataset":
            identity = self.snapshot(k)
            check_snapshot_version(self.run_dir.stage(k, name), identity["version"], identity["inputs"])
        else:
            inputs = {
                "samples": self.samples,
                "verdicts": self.verdicts,
                "model": self.model,
                "eval": self.eval,
            }
            check_stage(self.run_dir.stage(k, name), inputs[name](k), hint=self.config_hint)
        return True

    def check_finished(self) -> None:
        """Checks every finished stage this config's loop would reuse, in the loop's order, so that a run
        is refused before it writes anything (config.yaml included)."""
        stages = [(0, "eval")]
        stages += [(k, name) for k in range(1, self.cfg.loop.iterations + 1) for name in ITERATION_STAGES]
        if self.cfg.loop.sft_baseline:
            stages += [("sft_human", "model"), ("sft_human", "eval")]
        for k, name in stages:
            self.is_current(k, name)

    def config_hint(self) -> str:
        """Where this config differs from the run's ``config.yaml`` (the last run that was not refused):
        names the setting behind a changed fingerprint (weights, prompts) that is no key of the stage."""
        path = self.run_dir.root / "config.yaml"
        if not path.is_file():
            return ""
        old = OmegaConf.to_container(OmegaConf.load(path))
        new = OmegaConf.to_container(self.cfg, resolve=True)
        changes, _ = diff_inputs({"config": old}, {"config": new})
        shown = [f"{key}: {a} -> {b}" for key, a, b in changes if not key.startswith(_NOT_HINTED)]
        if len(shown) > _MAX_HINTED:
            shown = [*shown[:_MAX_HINTED], f"{len(shown) - _MAX_HINTED} more"]
        return f"; the run's config.yaml differs from this config in {'; '.join(shown)}" if shown else ""


def check_stage(stage_dir: Path, inputs: dict, *, hint: Callable[[], str] | None = None) -> None:
    """Refuses the finished stage ``stage_dir`` unless it records exactly ``inputs``.

    Args:
        stage_dir: a finished stage folder.
        inputs: what this config would make the stage from (``{"config": ..., "data": ...}``).
        hint: called for text to add when no config key of the stage changed (e.g. the keys in which
            the run's config.yaml differs).

    Raises:
        StaleStageError: naming the folder, the changed config keys (dotted, old -> new) and data.
    """
    info = read_json(Path(stage_dir) / STAGE_FILE)
    if "inputs" not in info:
        raise StaleStageError(
            f"{stage_dir} was finished by an older version of restem that did not record what it was made "
            f"from, so it cannot be checked against this config; {NEW_RUN_DIR} (nothing was changed)"
        )
    if info.get("inputs_sha256") == digest(inputs):
        return
    config_changes, data_changes = diff_inputs(info["inputs"], inputs)
    parts = [f"{key}: {old} -> {new}" for key, old, new in config_changes]
    if data_changes:
        parts.append(f"changed: {', '.join(data_changes)}")
    raise StaleStageError(
        f"{stage_dir} was made from other inputs than this config gives ({'; '.join(parts) or 'inputs'})"
        f"{'' if config_changes or hint is None else hint()}. A finished stage is never reused under "
        f"another config or overwritten: {NEW_RUN_DIR} (nothing was changed)"
    )


_UNSET = "(unset)"


def diff_inputs(old: dict, new: dict) -> tuple[list[tuple[str, str, str]], list[str]]:
    """(changed config keys as ``(dotted key, old repr, new repr)``, labels of changed data) of two inputs."""
    new = json.loads(json.dumps(new, default=str))  # compare as recorded: tuples are lists in JSON
    config = [
        (key, _UNSET if a is _MISSING else repr(a), _UNSET if b is _MISSING else repr(b))
        for key, a, b in _diff(old.get("config", {}), new.get("config", {}))
    ]
    old_data, new_data = old.get("data", {}), new.get("data", {})
    data = [k for k in sorted(set(old_data) | set(new_data)) if old_data.get(k) != new_data.get(k)]
    return config, data


_MISSING = object()


def _diff(old: dict, new: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append((f"{prefix}{key}", a, b))
    return changes


@contextlib.contextmanager
def stage_inputs(cfg: DictConfig) -> Iterator[StageInputs]:
    """The ``StageInputs`` of ``cfg``'s run dir, for the stage commands (refuses an incompatible run dir;
    closes the task's verifier afterwards)."""
    from factory.tasks import build_task

    run_dir = RunDir(cfg.paths.run_dir)
    run_dir.check_format()
    task = build_task(cfg.task, data_dir=cfg.paths.data_dir)
    try:
        yield StageInputs(cfg, task=task, run_dir=run_dir)
    finally:
        task.close()


def snapshot_pairs(dataset_dir: Path) -> list[dict]:
    """The kept samples of a snapshot (``iter_k/dataset``) as prompt/completion pairs (the M-step's data)."""
    from datasets import load_from_disk

    ds = load_from_disk(str(dataset_dir))["train"]
    return [{"prompt": p, "completion": c} for p, c in zip(ds["prompt"], ds["completion"], strict=True)]


def policy_draw(run_dir, iteration: int) -> int:
    """How many earlier iterations sampled the same policy as ``iteration`` (0 unless snapshots were
    empty and ``loop.stop_on_empty_snapshot=false`` went on with the same policy)."""
    for j in range(iteration - 1, 0, -1):
        if run_dir.is_done(j, "model"):
            return iteration - 1 - j
    return iteration - 1


def policy_path(run_dir, base_path, iteration: int):
    """The policy that samples iteration k: the newest trained model before k (p_{k-1}), else the base.

    An iteration whose snapshot was empty trains no model; the next one samples with the same policy.
    """
    for j in range(iteration - 1, 0, -1):
        if run_dir.is_done(j, "model"):
            return run_dir.stage(j, "model")
    return base_path
