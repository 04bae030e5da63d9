"""The M-step's engine: fine-tune a causal LM on prompt/completion pairs and export it with save_pretrained.

``fine_tune`` is the one fit every training path runs (the M-step, the SFT baseline, the tiny model's base
pretraining, torchrun jobs); ``fine_tune_base`` loads a saved base model for it. The stage command that
picks the base model and the snapshot is ``train.m_step`` (``restem-train``).

Precision: the optimizer always steps fp32 master weights, whatever ``model.dtype`` says: at a fine-tuning
rate (1e-5) most AdamW updates of a bf16 weight are below its rounding step and would be lost. Mixed
precision is the Trainer's autocast (``trainer.precision: bf16-mixed``); the exported folder holds the
weights in the model's own dtype (``model.dtype``), which is what sampling and evaluation load.
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from factory.config import check_trainer
from factory.rundir import atomic_dir, mark_done, write_json
from factory.tracking import clear_series, make_logger
from train.checkpoints import CheckpointResume
from train.data import PromptCompletionDataModule, num_steps, tokenize_pairs
from train.module import CausalLMModule
from train.strategy import (
    accumulation,
    build_strategy,
    full_state_dict,
    gathered_model,
    is_sharded,
    num_processes,
)
from train.throughput import TokensPerSecond

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
    export_dtype: str | None = None,
    tracking: dict | None = None,
) -> dict:
    """Trains ``model`` on prompt/completion ``pairs`` and saves model + tokenizer to ``out_dir`` atomically.

    With ``settings.checkpoint_every_n_steps`` > 0, Lightning checkpoints go to ``out_dir``'s hidden
    ``.partial`` sibling, and a rerun with the same settings and data resumes from the newest one; the
    sibling is removed once the model is saved.

    Args:
        model: a transformers causal LM, trained in place with fp32 master weights (a lower-precision model
            is cast to fp32 first, and back to ``export_dtype`` for the export); with LoRA the adapters end
            merged into it.
        tokenizer: its tokenizer (saved next to it).
        pairs: dicts with ``prompt`` and ``completion``; only completion tokens are in the loss. Prompts
            longer than ``settings.max_seq_len`` lose their start; pairs whose completion does not fit are
            dropped (both counted in the returned info).
        out_dir: the final folder; written via a temporary sibling and a rename.
        settings: trainer settings (``conf/trainer``: max_steps or epochs, batch_size, lr, lora, ...).
        desc: label for the log line.
        extra_info: merged into the folder's ``stage.json``.
        callbacks: extra Lightning callbacks (benchmarks, tests).
        export_dtype: the saved weights' dtype (``model.dtype``: what sampling loads); None: the dtype
            ``model`` came in.
        tracking: ``factory.tracking.fit_tracking``'s dict: log loss, learning rate and tokens/s to that
            logger every ``every_n_steps`` steps; None: no logger.

    Returns:
        dict with ``steps``, ``epochs`` (passes over the kept examples), ``num_examples`` (kept),
        ``num_pairs``, ``num_prompts_truncated``, ``num_dropped_too_long``,
        ``num_dropped_no_loss_tokens``, ``max_seq_len``, ``lora_r``, ``first_loss``, ``last_loss`` (mean of
        the last 50 steps), ``seconds``, ``resumed_from_step``.
    """
    start = time.time()
    check_trainer(settings)
    # Lightning's start-up banner (accelerator lines, cloud-logging tips) is noise in a loop of many fits.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    # lightning 2.6 calls a torch pytree API that torch 2.13 deprecates: harmless, not ours to fix.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # StepBatchSampler resumes at the restored global step itself (Lightning cannot know that).
    warnings.filterwarnings("ignore", message=r".*dataloader is not resumable.*")
    warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")
    export_dtype = export_dtype or str(model.dtype).removeprefix("torch.")
    to_fp32(model)
    L.seed_everything(int(settings.seed), verbose=False)
    max_len = max_sequence_length(settings, model.config)
    examples, data_stats = tokenize_pairs(tokenizer, pairs, max_length=max_len)
    # The step count needs the global batch before the Trainer exists: the same rule as accumulation().
    global_batch = int(settings.global_batch_size or int(settings.batch_size) * num_processes(settings))
    steps = num_steps(
        max_steps=int(settings.max_steps),
        epochs=settings.epochs,
        num_examples=len(examples),
        global_batch_size=global_batch,
    )
    dropped = data_stats["num_dropped_too_long"] + data_stats["num_dropped_no_loss_tokens"]
    if dropped or data_stats["num_prompts_truncated"]:
        log.warning(
            "%s: max_seq_len=%d tokens: %d of %d prompts cut from the left, %d pairs dropped (%d completions "
            "too long, %d with no loss tokens)",
            desc,
            max_len,
            data_stats["num_prompts_truncated"],
            len(pairs),
            dropped,
            data_stats["num_dropped_too_long"],
            data_stats["num_dropped_no_loss_tokens"],
        )
    data = PromptCompletionDataModule(
        examples,
        pad_token_id=tokenizer.pad_token_id,
        batch_size=int(settings.batch_size),
        max_steps=steps,
        global_batch_size=settings.global_batch_size,
        packing=bool(settings.packing),
        seed=int(settings.seed),
    )
    lora = OmegaConf.to_container(settings.lora, resolve=True)
    module = CausalLMModule(
        model,
        lr=float(settings.lr),
        weight_decay=float(settings.weight_decay),
        warmup_steps=int(settings.warmup_steps),
        max_steps=steps,
        min_lr_ratio=float(settings.min_lr_ratio),
        loss_chunk_size=int(settings.loss_chunk_size),
        compile=bool(settings.compile),
        gradient_checkpointing=bool(settings.gradient_checkpointing),
        lora=lora,
    )
    partial = Path(out_dir).with_name(f".{Path(out_dir).name}.partial")
    checkpoints = CheckpointResume(
        partial, settings=settings, pairs=pairs, model_config=model.config.to_json_string()
    )
    logger = make_logger(tracking)
    trainer = L.Trainer(
        accelerator=settings.accelerator,
        devices=settings.devices,
        strategy=build_strategy(settings),
        num_nodes=int(settings.num_nodes),
        precision=settings.precision,
        max_steps=steps,
        max_epochs=1,  # the data stream is exactly `steps` global batches long (StepBatchSampler)
        gradient_clip_val=float(settings.grad_clip),
        use_distributed_sampler=False,  # StepBatchSampler gives each rank its share itself
        logger=logger or False,
        callbacks=checkpoints.callbacks(int(settings.checkpoint_every_n_steps))
        + progress_bar(settings)
        + tracking_callbacks(logger)
        + list(callbacks or []),
        enable_checkpointing=bool(settings.checkpoint_every_n_steps),
        enable_model_summary=False,
        enable_progress_bar=bool(settings.progress_bar),
        default_root_dir=str(partial),
        log_every_n_steps=int(tracking["every_n_steps"]) if tracking else 50,
    )
    # Known once the trainer knows its world size; StepBatchSampler checks that it divides evenly.
    trainer.accumulate_grad_batches = accumulation(settings, trainer.world_size)
    resume = checkpoints.last() if settings.checkpoint_every_n_steps else None
    if logger is not None and resume is None and trainer.is_global_zero:
        # An earlier attempt's curve (other settings, or killed before a checkpoint) is not this fit's.
        clear_series(tracking)
    epochs = round(steps * global_batch / len(examples), 3)
    log.info(
        "%s: %d examples, %d steps of %d (%.3g epochs; micro-batch %d x %d devices x %d accumulation)%s%s",
        desc,
        len(examples),
        steps,
        global_batch,
        epochs,
        settings.batch_size,
        trainer.world_size,
        trainer.accumulate_grad_batches,
        f", LoRA r={lora['r']}" if lora["r"] else "",
        f", resuming from {resume}" if resume else "",
    )
    if (
        settings.epochs is not None
        and steps == int(settings.max_steps) < settings.epochs * len(examples) / global_batch
    ):
        log.warning(
            "%s: trainer.epochs=%s needs more than trainer.max_steps=%d steps: capped at %.3g epochs",
            desc,
            settings.epochs,
            steps,
            epochs,
        )
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    # Under FSDP gathering the full weights is a collective, so every rank takes part; only rank 0 writes.
    sharded = is_sharded(trainer.strategy)
    state = full_state_dict(model) if sharded else None
    losses = module.losses
    tail = losses[-50:]
    info = {
        "steps": len(losses),
        "epochs": epochs,
        **data_stats,
        "max_seq_len": max_len,
        "lora_r": lora["r"],
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
    trained = gathered_model(model, state) if sharded else module.export_model()
    # The export is what sampling loads, in model.dtype (bf16 halves the folder); the fp32 master weights
    # are not needed again: the next M-step starts from the base model.
    trained.to(getattr(torch, export_dtype))
    with atomic_dir(Path(out_dir)) as tmp:
        trained.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "train_log.json", {"losses": [round(x, 5) for x in losses]})
        info["seconds"] = round(time.time() - start, 3)
        mark_done(tmp, **info)
    shutil.rmtree(partial, ignore_errors=True)
    return info


def fine_tune_base(
    *,
    base_path: Path | str,
    pairs: list[dict],
    out_dir: Path,
    settings: DictConfig,
    export_dtype: str,
    desc: str,
    extra_info: dict | None = None,
    callbacks: list | None = None,
    tracking: dict | None = None,
) -> dict:
    """``fine_tune`` of a saved base model, loaded with fp32 master weights whatever its stored dtype (a
    bf16 checkpoint widens exactly; an fp32 one loaded in bf16 would lose precision before training)."""
    from factory.models import load_model, load_tokenizer

    return fine_tune(
        model=load_model(base_path, dtype="float32"),
        tokenizer=load_tokenizer(base_path),
        pairs=pairs,
        out_dir=out_dir,
        settings=settings,
        desc=desc,
        extra_info=extra_info,
        callbacks=callbacks,
        export_dtype=export_dtype,
        tracking=tracking,
    )


def progress_bar(settings: DictConfig) -> list:
    """The fit's progress bar: tqdm's, as every other stage's.

    Lightning picks its Rich bar when ``rich`` is installed, and Rich draws nothing into a file or pipe
    until the fit ends: a run in the background (``restem ... > log``) showed no M-step progress for 23
    minutes. tqdm writes each update.
    """
    from lightning.pytorch.callbacks import TQDMProgressBar

    return [TQDMProgressBar()] if settings.progress_bar else []


def tracking_callbacks(logger) -> list:
    """A tracked fit's learning-rate and tokens/s series (its loss is the module's own ``self.log``)."""
    if logger is None:
        return []
    from lightning.pytorch.callbacks import LearningRateMonitor

    return [LearningRateMonitor(logging_interval="step"), TokensPerSecond()]


def to_fp32(model) -> None:
    """Casts ``model``'s floating-point weights to fp32 in place when any is not (master weights)."""
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
        log.info("training with fp32 master weights (the model came in %s)", model.dtype)
        model.float()


def max_sequence_length(settings: DictConfig, model_config) -> int:
    """Tokens per training example: ``settings.max_seq_len``, at most the model's position embeddings."""
    positions = getattr(model_config, "max_position_embeddings", None)
    return min(int(settings.max_seq_len), int(positions)) if positions else int(settings.max_seq_len)
