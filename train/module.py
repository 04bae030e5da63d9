"""The M-step's LightningModule: next-token loss on completion tokens, AdamW, warmup then linear decay."""

from __future__ import annotations

import lightning as L
import torch

from factory.faults import kill_point


def warmup_linear_decay(step: int, *, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then linear decay to ``min_lr_ratio`` at ``max_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return 1.0 - (1.0 - min_lr_ratio) * progress


class CausalLMModule(L.LightningModule):
    """Wraps a transformers causal LM; ``losses`` keeps the per-step training loss for reports and tests."""

    def __init__(
        self, model, *, lr: float, weight_decay: float, warmup_steps: int, max_steps: int, min_lr_ratio: float
    ):
        super().__init__()
        self.model = model
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.max_steps = max_steps
        self.min_lr_ratio = min_lr_ratio
        self.losses: list[float] = []

    def on_fit_start(self) -> None:
        # from_pretrained returns the model in eval mode and Lightning keeps submodule modes as found.
        self.model.train()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        kill_point("train.step")
        loss = self.model(**batch).loss
        self.losses.append(float(loss.detach()))
        self.log("loss", loss, prog_bar=True, on_step=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
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
