"""The HF backend: a batched decode loop over transformers models with per-sample counter-based noise.

Each prompt is prefilled once and its KV cache repeated for its K samples; finished rows are dropped from
the batch as they end. Sampling is Gumbel-max with noise hashed from (row seed, step, token id)
(:mod:`factory.sampling.gumbel`), so sample j of a prompt depends only on its own seed: not on K, the
batch size, the prompt order or the other prompts in the batch (up to floating-point differences of the
batch shape, see ``generate``). The model runs where it lies (``model.device``); :func:`load_policy`
puts it on the best device there is.
"""

from __future__ import annotations

import inspect

import torch
from tqdm.auto import tqdm

from factory.sampling.completions import finish, model_stop_ids, stop_string_seen, tail_length
from factory.sampling.gumbel import pick_tokens
from factory.sampling.kv_cache import decode_attention, make_cache
from factory.sampling.seeds import derive_seed

__all__ = ["best_device", "generate", "load_policy", "pick_tokens"]


def best_device() -> torch.device:
    """Where sampling and evaluation run: the (first) CUDA device when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_policy(path, *, dtype: str = "float32"):
    """A model for sampling or evaluation: weights in ``dtype`` on :func:`best_device`, in eval mode."""
    from factory.models import load_model

    return load_model(path, dtype=dtype).to(best_device()).eval()


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
    stop_token_ids: list[int] | None = None,
    desc: str = "sampling",
    progress: bool = True,
) -> list[list[dict]]:
    """Samples ``num_samples`` completions for each prompt; ``temperature == 0`` means greedy decoding.

    Sample j of prompt i is drawn with seed ``seeds[i] + j`` (the convention of vLLM's ``n``-sample
    requests); without ``seeds``, prompt i gets ``derive_seed(seed, i)``. Prompts are tokenized with one
    BOS (``factory.tokens.encode_prompt``) and batched by token length (``batch_size`` prompts per call, so
    ``batch_size * num_samples`` rows). Samples are the same for any K, batch size or prompt order as long
    as the model's logits are; batch shapes can change the last bits of a CPU matmul, which flips a sample
    only at a near-tie of two tokens.

    Args:
        stop: Stop strings: a row stops once its text holds one, and the completion is cut before it.
        stop_token_ids: Ids that end a completion (default: ``factory.tokens.stop_token_ids`` of the
            tokenizer plus the model's generation config ``eos_token_id``).

    Returns:
        For each prompt (input order), ``num_samples`` dicts with ``completion``, ``num_tokens``,
        ``finish_reason`` ("stop": an end token or a ``stop`` string, "length": cut at max_new_tokens) and
        ``seed``.
    """
    from factory.tokens import encode_prompts

    model.eval()
    if seeds is None:
        seeds = [derive_seed(seed, i) for i in range(len(prompts))]
    stop = list(stop)
    stop_ids = list(stop_token_ids) if stop_token_ids is not None else model_stop_ids(model, tokenizer)
    if not stop_ids:
        raise ValueError("no end-of-completion token: the tokenizer has no EOS and none was given")
    k = 1 if temperature == 0 else num_samples
    token_ids = encode_prompts(tokenizer, list(prompts))
    order = sorted(range(len(prompts)), key=lambda i: len(token_ids[i]))
    results: list[list[dict]] = [[] for _ in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress, leave=False)
    with decode_attention(model):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            row_seeds = [seeds[i] + j for i in idx for j in range(k)]
            new = _decode(
                model,
                [token_ids[i] for i in idx],
                num_samples=k,
                seeds=row_seeds,
                pad_token_id=pad,
                stop_ids=stop_ids,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                stop_seen=(lambda tails: stop_string_seen(tokenizer, tails, stop)) if stop else None,
                tail=tail_length(stop),
            )
            for row, ids in enumerate(new):
                sample = finish(tokenizer, ids, stop=stop, stop_ids=stop_ids)
                results[idx[row // k]].append({**sample, "seed": row_seeds[row]})
            bar.update(len(idx))
    bar.close()
    if k < num_samples:  # greedy: every sample is the same completion
        results = [per * num_samples for per in results]
    return results


def _decode(
    model,
    prompts: list[list[int]],
    *,
    num_samples: int,
    seeds: list[int],
    pad_token_id: int,
    stop_ids: list[int],
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    stop_seen=None,
    tail: int = 0,
) -> list[list[int]]:
    """Prefills left-padded prompts once, repeats each prompt's cache K times, decodes until an end token,
    a stop string (``stop_seen`` on each running row's last ``tail`` tokens) or the limit, and drops
    finished rows from the batch. Returns the new token ids of each row (prompt-major)."""
    device = model.device
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
    prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    cache = make_cache(model.config, capacity=width + max_new_tokens)
    # transformers renamed `past_key_values` to `cache` (5.2x); use whichever this version's forward takes.
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    logits = model(
        input_ids=ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True, logits_to_keep=1,
        **{cache_kw: cache},
    ).logits[:, -1]  # fmt: skip
    # Generated positions are always attended: one mask for the whole decode, sliced per step.
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(len(prompts), max_new_tokens)], dim=-1)
    position = positions[:, -1:]
    if num_samples > 1:
        cache.batch_repeat_interleave(num_samples)
        logits = logits.repeat_interleave(num_samples, dim=0)
        mask = mask.repeat_interleave(num_samples, dim=0)
        position = position.repeat_interleave(num_samples, dim=0)
    rows = mask.shape[0]
    out: list[list[int]] = [[] for _ in range(rows)]
    all_seeds = torch.tensor(seeds, dtype=torch.long, device=device)
    ends = torch.tensor(stop_ids, dtype=torch.long, device=device)
    alive = list(range(rows))  # original row of each batch row
    done = [False] * rows  # rows that ended but are still in the batch
    for step in range(max_new_tokens):
        row_seeds = all_seeds if len(alive) == rows else all_seeds[torch.tensor(alive, device=device)]
        tokens = pick_tokens(
            logits, seeds=row_seeds, step=step, temperature=temperature, top_k=top_k, top_p=top_p
        )
        ended = torch.isin(tokens, ends).tolist()
        for i, (row, token) in enumerate(zip(alive, tokens.tolist(), strict=True)):
            if not done[i]:
                out[row].append(token)
                done[i] = ended[i]
        running = [i for i in range(len(alive)) if not done[i]]
        if stop_seen is not None and running:
            for i, seen in zip(running, stop_seen([out[alive[i]][-tail:] for i in running]), strict=True):
                done[i] = seen
        if step == max_new_tokens - 1 or all(done):
            break
        # Drop finished rows once they are a quarter of the batch: later steps cost only what is still
        # running, without copying the whole cache every time one row ends.
        if sum(done) * 4 >= len(done):
            keep = [i for i, d in enumerate(done) if not d]
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            tokens, mask, position = tokens[index], mask[index], position[index]
            alive, done = [alive[i] for i in keep], [False] * len(keep)
        position = position + 1
        logits = model(
            input_ids=tokens[:, None], attention_mask=mask[:, : width + step + 1], position_ids=position,
            use_cache=True, **{cache_kw: cache},
        ).logits[:, -1]  # fmt: skip
    return out
