"""Training throughput for experiment tracking: ``tokens_per_s``, this process's non-padding tokens per
second of wall time (rank 0's in a multi-process fit: only rank 0 writes), logged once per optimizer step
(with ``logger=tensorboard``; factory/tracking.py)."""

from __future__ import annotations

import time

from lightning.pytorch.callbacks import Callback


def batch_tokens(batch: dict):
    """Non-padding tokens of a micro-batch: its attention mask's ones (a tensor on the batch's device: no
    wait for the device here), or every token of a packed row."""
    mask = batch.get("attention_mask")
    return mask.sum() if mask is not None else batch["input_ids"].numel()


class TokensPerSecond(Callback):
    """Logs ``tokens_per_s`` for each optimizer step: the tokens of its micro-batches (every accumulation
    round) over the time from its first micro-batch's start to its last one's end."""

    def __init__(self) -> None:
        self._start: float | None = None
        self._tokens = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._start is None:
            self._start = time.perf_counter()
        self._tokens += batch_tokens(batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # more accumulation rounds before this optimizer step
        tokens = float(self._tokens)  # waits for the device once per optimizer step, before the clock stops
        seconds = max(time.perf_counter() - self._start, 1e-9)
        pl_module.log("tokens_per_s", tokens / seconds, on_step=True, on_epoch=False, batch_size=1)
        self._start, self._tokens = None, 0
