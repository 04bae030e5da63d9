"""Next-token cross-entropy summed over target tokens, optionally in chunks that never hold all fp32 logits.

For a large vocabulary (Qwen2.5: 151,936) the full ``[tokens, vocab]`` fp32 logits of a batch are the
largest tensor of a training step. ``causal_lm_loss_sum`` projects only the positions that carry a label
(prompt tokens never reach the head) and, with ``chunk_size``, does so ``chunk_size`` positions at a time
under activation checkpointing, so at most one chunk's logits exist in the forward and in the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from train.data import IGNORE_INDEX


def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def causal_lm_loss_sum(
    hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module, *, chunk_size: int = 0
) -> torch.Tensor:
    """Sum of next-token losses: position t predicts ``labels[t+1]``; ``IGNORE_INDEX`` labels are skipped.

    Args:
        hidden: the decoder's last hidden states, ``[batch, seq, hidden]``.
        labels: ``[batch, seq]`` token ids, ``IGNORE_INDEX`` where no loss is wanted.
        head: the output projection (``model.get_output_embeddings()``).
        chunk_size: positions per chunk (0: all target positions at once).

    Returns:
        A float32 scalar: the summed loss (divide by the number of targets for the mean).
    """
    targets = labels[:, 1:].reshape(-1)
    keep = targets != IGNORE_INDEX
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])[keep]
    targets = targets[keep]
    if not chunk_size or chunk_size >= len(targets):
        return _chunk_loss(h, targets, head)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(targets), chunk_size):
        end = start + chunk_size
        total = total + checkpoint(_chunk_loss, h[start:end], targets[start:end], head, use_reentrant=False)
    return total
