"""Seeded Gumbel-max sampling: the next token of each row from noise hashed from (row seed, step, token id).

The noise of a token depends only on its row's seed, the decode step and its id, so a sample does not depend
on K, the batch or the other rows. Noise is computed only for the tokens that can win (the top-k, or the
tokens top-p keeps): the argmax over them is exactly the argmax of ``scores + noise`` over the whole
vocabulary, because a masked (-inf) token never wins and every kept token gets the same noise either way.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
# Candidates are gathered when at most this share of the vocabulary can win; else the whole row is hashed.
_GATHER_SHARE = 4


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for int64 ``x`` in [0, 2**32), split so that no product overflows int64."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash (lowbias32 by C. Wellons) on int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def gumbel_noise_at(seeds: torch.Tensor, step: int, token_ids: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise for ``token_ids`` (rows x n, or 1 x n for every row), a function of
    (row seed, step, token id) only."""
    row = _mix32(_mix32(seeds.long() & _MASK32) ^ step)
    bits = _mix32(row[:, None] ^ token_ids.long()) >> 9  # 23 bits: u stays in (0, 1) in float32
    u = (bits.float() + 0.5) / float(1 << 23)
    return -torch.log(-torch.log(u))


def gumbel_noise(seeds: torch.Tensor, step: int, vocab_size: int) -> torch.Tensor:
    """Gumbel(0, 1) noise of shape (rows, vocab) that depends only on (row seed, step, token id)."""
    return gumbel_noise_at(seeds, step, torch.arange(vocab_size, device=seeds.device)[None, :])


def filter_logits(logits: torch.Tensor, *, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) masking, as transformers and vLLM apply them."""
    return _mask(logits.float() / temperature, top_k=top_k, top_p=top_p)


def _mask(scores: torch.Tensor, *, top_k: int, top_p: float) -> torch.Tensor:
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        probs = sorted_scores.softmax(-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (keeps >= 1).
        drop = (probs.cumsum(-1) - probs) > top_p
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return scores


def pick_tokens(
    logits: torch.Tensor, *, seeds: torch.Tensor, step: int, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """The next token of each row: argmax when ``temperature == 0``, else a seeded Gumbel-max sample.

    The same tokens as ``(filter_logits(logits) + gumbel_noise(seeds, step, vocab)).argmax(-1)``, with
    noise computed only where it can matter.
    """
    if temperature == 0:
        return logits.argmax(-1)
    vocab = logits.shape[-1]
    if top_p >= 1.0 and 0 < top_k < vocab:
        # Dividing by T keeps the order, so the top k+1 logits give the top k+1 scores. When the (k+1)-th
        # score is below the k-th, exactly these k tokens survive the whole-vocabulary filter; a tie with
        # the k-th score (the filter keeps every tied token) takes the general path below.
        values, ids = torch.topk(logits, top_k + 1, dim=-1)
        values = values.float() / temperature
        if bool((values[:, top_k] < values[:, top_k - 1]).all()):
            return _pick_among(values[:, :top_k], ids[:, :top_k], seeds=seeds, step=step)
    scores = _mask(logits.float() / temperature, top_k=top_k, top_p=top_p)
    most = int((scores > float("-inf")).sum(-1).max())
    if most * _GATHER_SHARE <= vocab:
        values, ids = torch.topk(scores, most, dim=-1)  # rows with fewer candidates get -inf entries
        return _pick_among(values, ids, seeds=seeds, step=step)
    return (scores + gumbel_noise(seeds, step, vocab)).argmax(-1)


def _pick_among(values: torch.Tensor, ids: torch.Tensor, *, seeds: torch.Tensor, step: int) -> torch.Tensor:
    """The Gumbel-max winner among candidate ``ids`` with filtered scores ``values`` (rows x n)."""
    # In token order, so that a tie goes to the lowest token id, as argmax over the whole vocabulary does.
    ids, order = ids.sort(dim=-1)
    values = values.gather(-1, order)
    best = (values + gumbel_noise_at(seeds, step, ids)).argmax(-1, keepdim=True)
    return ids.gather(-1, best).squeeze(-1)
