"""The HF backend: a batched decode loop over transformers models with per-sample counter-based noise.

Each prompt is prefilled once and its KV cache repeated for its K samples; finished rows are dropped from
the batch as they end. Sampling is Gumbel-max with noise hashed from (row seed, step, token id), so
sample j of a prompt depends only on its own seed: not on K, the batch size, the prompt order or the
other prompts in the batch (up to floating-point differences of the batch shape, see ``generate``).
"""

from __future__ import annotations

import inspect

import torch
from tqdm.auto import tqdm

_MASK32 = 0xFFFFFFFF


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


def gumbel_noise(seeds: torch.Tensor, step: int, vocab_size: int) -> torch.Tensor:
    """Gumbel(0, 1) noise of shape (rows, vocab) that depends only on (row seed, step, token id)."""
    row = _mix32(_mix32(seeds.long() & _MASK32) ^ step)
    tokens = torch.arange(vocab_size, device=seeds.device)
    bits = _mix32(row[:, None] ^ tokens[None, :]) >> 9  # 23 bits: u stays in (0, 1) in float32
    u = (bits.float() + 0.5) / float(1 << 23)
    return -torch.log(-torch.log(u))


def filter_logits(logits: torch.Tensor, *, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) masking, as transformers and vLLM apply them."""
    scores = logits.float() / temperature
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
    """The next token of each row: argmax when ``temperature == 0``, else a seeded Gumbel-max sample."""
    if temperature == 0:
        return logits.argmax(-1)
    scores = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return (scores + gumbel_noise(seeds, step, scores.shape[-1])).argmax(-1)


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    num_samples: int,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    max_new_tokens: int,
    batch_size: int,
    seeds: list[int] | None = None,
    seed: int = 0,
    stop: list[str] | tuple[str, ...] = (),
    desc: str = "sampling",
    progress: bool = True,
) -> list[list[dict]]:
    """Samples ``num_samples`` completions for each prompt; ``temperature == 0`` means greedy decoding.

    Sample j of prompt i is drawn with seed ``seeds[i] + j`` (the convention of vLLM's ``n``-sample
    requests); without ``seeds``, prompt i gets ``derive_seed(seed, i)``. Prompts are batched by token
    length (``batch_size`` prompts per call, so ``batch_size * num_samples`` rows). Samples are the same
    for any K, batch size or prompt order as long as the model's logits are; batch shapes can change the
    last bits of a CPU matmul, which flips a sample only at a near-tie of two tokens.

    Returns:
        For each prompt (input order), ``num_samples`` dicts with ``completion``, ``num_tokens``,
        ``finish_reason`` ("stop": EOS or a ``stop`` string, "length": cut at max_new_tokens) and ``seed``.
    """
    from factory.sample import derive_seed

    model.eval()
    if seeds is None:
        seeds = [derive_seed(seed, i) for i in range(len(prompts))]
    k = 1 if temperature == 0 else num_samples
    token_ids = tokenizer(list(prompts))["input_ids"]
    order = sorted(range(len(prompts)), key=lambda i: len(token_ids[i]))
    results: list[list[dict]] = [[] for _ in prompts]
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress, leave=False)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        row_seeds = torch.tensor([seeds[i] + j for i in idx for j in range(k)], dtype=torch.long)
        new = _decode(
            model,
            [token_ids[i] for i in idx],
            num_samples=k,
            seeds=row_seeds,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
        )
        for row, ids in enumerate(new):
            sample = _finish(tokenizer, ids, stop=stop)
            results[idx[row // k]].append({**sample, "seed": int(row_seeds[row])})
        bar.update(len(idx))
    bar.close()
    if k < num_samples:  # greedy: every sample is the same completion
        results = [per * num_samples for per in results]
    return results


def _finish(tokenizer, ids: list[int], *, stop) -> dict:
    """Decodes one row, cutting it at EOS or at the first stop string (excluded, as vLLM does)."""
    eos = tokenizer.eos_token_id
    n = ids.index(eos) if eos in ids else len(ids)
    text = tokenizer.decode(ids[:n], skip_special_tokens=True)
    reason = "stop" if n < len(ids) else "length"
    hits = [(text.find(s), s) for s in stop if s in text]
    if hits:
        at, _ = min(hits)
        text, reason = text[:at], "stop"
        # The fewest tokens whose text holds the stop string: what vLLM reports as generated.
        lo, hi = 1, n
        while lo < hi:
            mid = (lo + hi) // 2
            piece = tokenizer.decode(ids[:mid], skip_special_tokens=True)
            lo, hi = (lo, mid) if any(s in piece for s in stop) else (mid + 1, hi)
        n = lo
    return {"completion": text, "num_tokens": n, "finish_reason": reason}


def _decode(
    model,
    prompts: list[list[int]],
    *,
    num_samples: int,
    seeds: torch.Tensor,
    pad_token_id: int,
    eos_token_id: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
) -> list[list[int]]:
    """Prefills left-padded prompts once, repeats each prompt's cache K times, decodes until EOS or the
    limit, and drops finished rows from the batch. Returns the new token ids of each row (prompt-major)."""
    from transformers import DynamicCache

    device = model.device
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    # transformers renamed `past_key_values` to `cache` (5.2x); use whichever this version's forward takes.
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    logits = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
        **{cache_kw: cache},
    ).logits[:, -1]  # fmt: skip
    if num_samples > 1:
        cache.batch_repeat_interleave(num_samples)
        logits = logits.repeat_interleave(num_samples, dim=0)
        mask = mask.repeat_interleave(num_samples, dim=0)
        positions = positions.repeat_interleave(num_samples, dim=0)
    rows = mask.shape[0]
    out = [[] for _ in range(rows)]
    alive = torch.arange(rows, device=device)  # original row of each batch row
    done = torch.zeros(rows, dtype=torch.bool, device=device)  # rows that ended but are still in the batch
    position = positions[:, -1:]
    for step in range(max_new_tokens):
        tokens = pick_tokens(
            logits, seeds=seeds[alive.cpu()].to(device), step=step, temperature=temperature, top_k=top_k,
            top_p=top_p,
        )  # fmt: skip
        for row, token, ended in zip(alive.tolist(), tokens.tolist(), done.tolist(), strict=True):
            if not ended:
                out[row].append(token)
        done = done | (tokens == eos_token_id)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        # Drop finished rows once they are a quarter of the batch: later steps cost only what is still
        # running, without copying the whole cache every time one row ends.
        if int(done.sum()) * 4 >= len(done):
            keep = (~done).nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            alive, tokens, mask, position, done = (
                alive[keep],
                tokens[keep],
                mask[keep],
                position[keep],
                done[keep],
            )
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        position = position + 1
        logits = model(
            input_ids=tokens[:, None], attention_mask=mask, position_ids=position, use_cache=True,
            **{cache_kw: cache},
        ).logits[:, -1]  # fmt: skip
    return out
