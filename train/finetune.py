"""The M-step: fine-tune the BASE model on an iteration's snapshot and export it with save_pretrained.

Command: ``restem-train iteration=2`` trains ``iter_2/model`` from the base model on ``iter_2/dataset``.
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from pathlib import Path

import lightning as L
from omegaconf import DictConfig

from factory.config import hydra_entry
from factory.rundir import atomic_dir, mark_done, write_json
from train.checkpoints import CheckpointResume
from train.data import PromptCompletionDataModule
from train.module import CausalLMModule
from train.strategy import accumulation, build_strategy, full_state_dict, gathered_model, is_sharded

log = logging.getLogger(__name__)


def fine_tune(
    *,
    model,
    tokenizer,
    pairs: list[dict],
    out_dir: Path,
    settings: DictConfig,
    desc: str = "M-step",
    extra_info: dict | None = None,
    callbacks: list | None = None,
) -> dict:
    """Trains ``model`` on prompt/completion ``pairs`` and saves model + tokenizer to ``out_dir`` atomically.

    With ``settings.checkpoint_every_n_steps`` > 0, Lightning checkpoints go to ``out_dir``'s hidden
    ``.partial`` sibling, and a rerun with the same settings and data resumes from the newest one; the
    sibling is removed once the model is saved.

    Args:
        model: a transformers causal LM (trained in place).
        tokenizer: its tokenizer (saved next to it).
        pairs: dicts with ``prompt`` and ``completion``; only completion tokens are in the loss.
        out_dir: the final folder; written via a temporary sibling and a rename.
        settings: trainer settings (``conf/trainer``: max_steps, batch_size, lr, ...).
        desc: label for the log line.
        extra_info: merged into the folder's ``stage.json``.
        callbacks: extra Lightning callbacks (benchmarks, tests).

    Returns:
        dict with ``steps``, ``first_loss``, ``last_loss`` (mean of the last 50 steps), ``seconds``,
        ``resumed_from_step``.
    """
    start = time.time()
    # Lightning's start-up banner (accelerator lines, cloud-logging tips) is noise in a loop of many fits.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    # lightning 2.6 calls a torch pytree API that torch 2.13 deprecates: harmless, not ours to fix.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # StepBatchSampler resumes at the restored global step itself (Lightning cannot know that).
    warnings.filterwarnings("ignore", message=r".*dataloader is not resumable.*")
    warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")
    L.seed_everything(int(settings.seed), verbose=False)
    data = PromptCompletionDataModule(
        tokenizer,
        pairs,
        batch_size=int(settings.batch_size),
        max_steps=int(settings.max_steps),
        global_batch_size=settings.global_batch_size,
        packing=bool(settings.packing),
        seed=int(settings.seed),
    )
    module = CausalLMModule(
        model,
        lr=float(settings.lr),
        weight_decay=float(settings.weight_decay),
        warmup_steps=int(settings.warmup_steps),
        max_steps=int(settings.max_steps),
        min_lr_ratio=float(settings.min_lr_ratio),
        loss_chunk_size=int(settings.loss_chunk_size),
        compile=bool(settings.compile),
        gradient_checkpointing=bool(settings.gradient_checkpointing),
    )
    partial = Path(out_dir).with_name(f".{Path(out_dir).name}.partial")
    checkpoints = CheckpointResume(
        partial, settings=settings, pairs=pairs, model_config=model.config.to_json_string()
    )
    trainer = L.Trainer(
        accelerator=settings.accelerator,
        devices=settings.devices,
        strategy=build_strategy(settings),
        num_nodes=int(settings.num_nodes),
        precision=settings.precision,
        max_steps=int(settings.max_steps),
        max_epochs=1,  # the data stream is exactly max_steps global batches long (StepBatchSampler)
        gradient_clip_val=float(settings.grad_clip),
        use_distributed_sampler=False,  # StepBatchSampler gives each rank its share itself
        logger=False,
        callbacks=checkpoints.callbacks(int(settings.checkpoint_every_n_steps)) + list(callbacks or []),
        enable_checkpointing=bool(settings.checkpoint_every_n_steps),
        enable_model_summary=False,
        enable_progress_bar=bool(settings.progress_bar),
        default_root_dir=str(partial),
        log_every_n_steps=50,
    )
    # Known once the trainer knows its world size; StepBatchSampler checks that it divides evenly.
    trainer.accumulate_grad_batches = accumulation(settings, trainer.world_size)
    resume = checkpoints.last() if settings.checkpoint_every_n_steps else None
    log.info(
        "%s: %d examples, %d steps of %d (micro-batch %d x %d devices x %d accumulation)%s",
        desc,
        len(pairs),
        settings.max_steps,
        settings.global_batch_size or settings.batch_size * trainer.world_size,
        settings.batch_size,
        trainer.world_size,
        trainer.accumulate_grad_batches,
        f", resuming from {resume}" if resume else "",
    )
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    # Under FSDP gathering the full weights is a collective, so every rank takes part; only rank 0 writes.
    sharded = is_sharded(trainer.strategy)
    state = full_state_dict(model) if sharded else None
    losses = module.losses
    tail = losses[-50:]
    info = {
        "steps": len(losses),
        "num_examples": len(pairs),
        "first_loss": losses[0] if losses else None,
        "last_loss": sum(tail) / len(tail) if tail else None,
        "resumed_from_step": checkpoints.step_of(resume) if resume else None,
        **(extra_info or {}),
    }
    for callback in callbacks or []:
        if hasattr(callback, "summary"):  # model selection (train/selection.py): what it kept and why
            info["selection"] = callback.summary
    if trainer.global_rank != 0:
        return info
    with atomic_dir(Path(out_dir)) as tmp:
        (gathered_model(model, state) if sharded else model).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "train_log.json", {"losses": [round(x, 5) for x in losses]})
        info["seconds"] = round(time.time() - start, 3)
        mark_done(tmp, **info)
    shutil.rmtree(partial, ignore_errors=True)
    return info


def human_pairs(task, tokenizer=None) -> list[dict]:
    """The human-written seed solutions as prompt/completion pairs (``tokenizer``: for chat prompts)."""
    return [
        {"prompt": task.format_prompt(p, tokenizer=tokenizer), "completion": p["solution"]}
        for p in task.load_problems(split="human")
    ]


def snapshot_pairs(dataset_dir: Path) -> list[dict]:
    """The kept samples of a snapshot (``iter_k/dataset``) as prompt/completion pairs."""
    from datasets import load_from_disk

    ds = load_from_disk(str(dataset_dir))["train"]
    return [{"prompt": p, "completion": c} for p, c in zip(ds["prompt"], ds["completion"], strict=True)]


def train_from_base(
    cfg: DictConfig,
    *,
    base_path: Path,
    pairs: list[dict],
    out_dir: Path,
    desc: str,
    inputs: dict | None = None,
) -> dict:
    """Loads the base model fresh (ReST-EM never continues from the previous policy) and fine-tunes it.

    A fit on several devices of one node that no launcher started runs as its own torchrun job
    (``train.launch``), so the loop can run one multi-process M-step after another. ``inputs``
    (``StageInputs.model``) are recorded in the model's ``stage.json``.
    """
    from factory.models import load_model, load_tokenizer
    from train.launch import launch_fit, needs_launch

    extra_info = {"base_model": str(base_path)}
    if inputs is not None:
        extra_info["inputs"] = inputs
    if needs_launch(cfg.trainer):
        return launch_fit(
            base_path=base_path,
            dtype=cfg.model.dtype,
            pairs=pairs,
            out_dir=out_dir,
            settings=cfg.trainer,
            desc=desc,
            extra_info=extra_info,
        )
    model = load_model(base_path, dtype=cfg.model.dtype)
    tokenizer = load_tokenizer(base_path)
    return fine_tune(
        model=model,
        tokenizer=tokenizer,
        pairs=pairs,
        out_dir=out_dir,
        settings=cfg.trainer,
        desc=desc,
        extra_info=extra_info,
    )


def run(cfg: DictConfig) -> dict:
    """Trains ``iter_{cfg.iteration}/model`` from the base model on that iteration's snapshot (a finished
    model of the same inputs is skipped, one of other inputs refused, as is a snapshot of another
    version)."""
    from factory.stage_inputs import stage_inputs

    k = int(cfg.iteration)
    with stage_inputs(cfg) as stages:
        dataset_dir, out = stages.run_dir.stage(k, "dataset"), stages.run_dir.stage(k, "model")
        if not stages.is_current(k, "dataset"):
            raise FileNotFoundError(
                f"no finished snapshot at {dataset_dir}: run restem-snapshot iteration={k} first"
            )
        if stages.is_current(k, "model"):
            return {"skipped": str(out)}
        pairs = stages.training_pairs(k)
        if not pairs:
            raise ValueError(
                f"the snapshot {dataset_dir} kept 0 samples: nothing to train on (its manifest.json has the "
                "verdict counts); sample more (sampler.num_samples) or set loop.include_human_data=true"
            )
        return train_from_base(
            cfg,
            base_path=stages.base,
            pairs=pairs,
            out_dir=out,
            desc=f"M-step iteration {k}",
            inputs=stages.model(k, pairs),
        )


main = hydra_entry(run)
