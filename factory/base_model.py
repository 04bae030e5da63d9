"""The base model p0: a Hub model by name/path, or the tiny local model pretrained on human seeds.

Command: ``restem-base`` builds (or finds in the cache) the base model of the current config.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from factory.config import LoraSettings, SelectConfig, hydra_entry
from factory.rundir import STAGE_FILE
from factory.tasks import arith

log = logging.getLogger(__name__)


# Trainer settings that do not change the pretrained weights: where it runs (the step stream does not
# depend on the number of ranks: tests/test_train_scale.py), how often it checkpoints, what it shows.
_NOT_IN_KEY = (
    "accelerator",
    "devices",
    "strategy",
    "num_nodes",
    "checkpoint_every_n_steps",
    "progress_bar",
    "select",  # trainer.select is the M-step's; the base's own is model.pretrain.select (in the key)
)


def pretrain_settings(cfg: DictConfig) -> DictConfig:
    """The trainer settings base pretraining runs with: ``trainer`` overridden by ``model.pretrain``.

    The M-step's budget rule and adapters are not the pretraining's: it runs ``model.pretrain.max_steps``
    steps of full training (``trainer.epochs`` and ``trainer.lora`` do not apply to a randomly initialised
    model).
    """
    # The schema's defaults, so changing trainer.lora.* or trainer.epochs never rebuilds the cached base model.
    m_step_only = {
        "epochs": None,
        "lora": OmegaConf.structured(LoraSettings),
        "select": OmegaConf.structured(SelectConfig),  # the base's selection is model.pretrain.select
    }
    pretrain = OmegaConf.to_container(cfg.model.pretrain, resolve=True)
    pretrain.pop("select", None)  # base selection's settings (model.pretrain.select), not trainer settings
    return OmegaConf.merge(cfg.trainer, m_step_only, pretrain)


def human_pairs(task, tokenizer=None) -> list[dict]:
    """The human-written seed solutions as prompt/completion pairs (``tokenizer``: for chat prompts).

    The tiny model is pretrained on them; the SFT baseline and ``loop.include_human_data`` train on them.
    """
    return [
        {"prompt": task.format_prompt(p, tokenizer=tokenizer), "completion": p["solution"]}
        for p in task.load_problems(split="human")
    ]


def base_model_key(cfg: DictConfig) -> str:
    """A short fingerprint of everything that determines the tiny base model: the model's shape, the
    human data, and every pretraining setting that changes the weights (``trainer.*`` included, unless
    ``model.pretrain`` overrides it)."""
    from factory.tasks import build_task

    # Only the task knows which of its config items shape the human split (train/test sizes do not).
    task = build_task(cfg.task, data_dir=cfg.paths.data_dir)
    settings = OmegaConf.to_container(pretrain_settings(cfg), resolve=True)
    payload = {
        "tiny": OmegaConf.to_container(cfg.model.tiny, resolve=True),
        "train": {k: v for k, v in settings.items() if k not in _NOT_IN_KEY},
        "task": task.human_data_fingerprint(),
        "select": _selection_fingerprint(cfg, task),
        "generator": arith.GENERATOR_VERSION,
        "format": 4,  # 4: selection scores with stop strings and the guarded judge
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def ensure_base_model(cfg: DictConfig) -> Path | str:
    """Returns the base model's location, pretraining the tiny model once per settings (cached).

    Returns the Hub name/path unchanged when ``model.name_or_path`` is set.
    """
    if cfg.model.name_or_path:
        return cfg.model.name_or_path
    out_dir = Path(cfg.paths.cache_dir) / "base_models" / f"{cfg.model.name}-{base_model_key(cfg)}"
    if (out_dir / STAGE_FILE).is_file():
        return out_dir
    log.info("pretraining the tiny base model on the human seed split -> %s", out_dir)
    # FileExistsError: another job (e.g. a parallel sweep point) finished the same base model first.
    with contextlib.suppress(FileExistsError):
        _pretrain_tiny(cfg, out_dir)
    return out_dir


def _pretrain_tiny(cfg: DictConfig, out_dir: Path) -> None:
    from factory.tasks import build_task

    # No tokenizer yet (it is trained from these pairs): the chat prompt style needs a Hub model.
    task = build_task(cfg.task, data_dir=cfg.paths.data_dir)
    try:
        _pretrain_with(cfg, task, out_dir)
    finally:
        task.close()  # the verifier's pool or sandbox that selection's scoring used


def _pretrain_with(cfg: DictConfig, task, out_dir: Path) -> None:
    from factory.models import build_tiny_model, train_char_tokenizer
    from train.finetune import fine_tune

    pairs = human_pairs(task, tokenizer=None)
    tokenizer = train_char_tokenizer([p["prompt"] + p["completion"] for p in pairs])
    tiny = cfg.model.tiny
    model = build_tiny_model(
        tokenizer,
        hidden_size=tiny.hidden_size,
        num_layers=tiny.num_layers,
        num_heads=tiny.num_heads,
        intermediate_size=tiny.intermediate_size,
        max_position_embeddings=tiny.max_position_embeddings,
        seed=int(cfg.trainer.seed),
    )
    # Same Lightning code and trainer as the M-step, with the pretraining budget and learning rate.
    settings = pretrain_settings(cfg)
    select = cfg.model.pretrain.select
    callbacks = []
    if select.every > 0:
        # Trained to its validation plateau and the best scoring weights kept: a fixed step count lands at
        # a different point of the learning curve on each CPU kind, the plateau does not.
        from train.selection import BestOnValidation, greedy_accuracy

        problems = _selection_problems(cfg, task)
        if not problems:
            raise ValueError(
                "config error: model.pretrain.select.every > 0 but the task has no validation problems"
            )
        callbacks.append(
            BestOnValidation.from_settings(greedy_accuracy(task, problems, tokenizer, cfg), select)
        )
    fine_tune(
        model=model,
        tokenizer=tokenizer,
        pairs=pairs,
        out_dir=out_dir,
        settings=settings,
        desc="base pretraining",
        extra_info={"key": base_model_key(cfg)},
        callbacks=callbacks,
        export_dtype=cfg.model.dtype,
    )


def _selection_problems(cfg: DictConfig, task) -> list[dict]:
    from train.selection import validation_problems

    return validation_problems(task, int(cfg.model.pretrain.select.num_problems))


def _selection_fingerprint(cfg: DictConfig, task) -> dict | None:
    """What base selection depends on (None when it is off): its settings, problems and decode length."""
    select = cfg.model.pretrain.select
    if select.every <= 0:
        return None
    from factory.versioning import problems_fingerprint

    return {
        **OmegaConf.to_container(select, resolve=True),
        "problems": problems_fingerprint(_selection_problems(cfg, task)),
        "max_new_tokens": int(cfg.eval.max_new_tokens),
        "stop": list(cfg.sampler.stop),  # with the task's own stops (part of its code)
    }


def run(cfg: DictConfig) -> dict:
    path = ensure_base_model(cfg)
    print(f"base model: {path}")
    return {"base_model": str(path)}


main = hydra_entry(run)
