"""What both backends share after the model has spoken: where a completion ends and what it says.

A completion ends at the first end-of-completion token (``factory.tokens.stop_token_ids``: the tokenizer's
EOS, every ``eos_token_id`` of the generation config, the chat template's end-of-turn token) or at the
first stop string (task stops plus ``sampler.stop``), whichever comes first; the end token and the stop
string are not part of it, as in vLLM.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def merge_stops(*groups: Iterable[str] | None) -> list[str]:
    """Stop strings of several sources (the task's, ``sampler.stop``) in order, without duplicates or
    empty strings."""
    merged: list[str] = []
    for group in groups:
        for stop in group or ():
            if stop and stop not in merged:
                merged.append(str(stop))
    return merged


def task_stop_strings(task) -> list[str]:
    """The task's stop strings for its prompt style (``task.stop_strings()``; none for a task without)."""
    method = getattr(task, "stop_strings", None)
    return list(method()) if method is not None else []


def model_stop_ids(model, tokenizer) -> list[int]:
    """Every end-of-completion id of a loaded transformers model: ``factory.tokens.stop_token_ids`` plus
    the ``eos_token_id`` (an int or a list) of the model's in-memory generation config."""
    from factory.tokens import stop_token_ids

    ids = set(stop_token_ids(tokenizer))
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is not None:
        ids.update(int(x) for x in (eos if isinstance(eos, (list, tuple)) else [eos]))
    return sorted(ids)


def finish(tokenizer, ids: Sequence[int], *, stop: Sequence[str] = (), stop_ids: Iterable[int] = ()) -> dict:
    """Decodes one row of new token ids, cut at its first end token or stop string.

    Args:
        tokenizer: The model's tokenizer.
        ids: Generated token ids (possibly running past the end: only the part before it counts).
        stop: Stop strings; the text is cut before the first one (excluded, as vLLM does).
        stop_ids: End-of-completion token ids (default: the tokenizer's EOS).

    Returns:
        ``completion``, ``num_tokens`` (the tokens vLLM would report as generated: up to the end token, or
        the fewest whose text holds the stop string) and ``finish_reason`` ("stop", or "length" when it
        ran to the end of ``ids`` without an end token or stop string).
    """
    ids = list(ids)
    ends = set(stop_ids) or {tokenizer.eos_token_id}
    n = next((i for i, token in enumerate(ids) if token in ends), len(ids))
    text = tokenizer.decode(ids[:n], skip_special_tokens=True)
    reason = "stop" if n < len(ids) else "length"
    hits = [(text.find(s), s) for s in stop if s in text]
    if hits:
        at, _ = min(hits)
        text, reason = text[:at], "stop"
        lo, hi = 1, n
        while lo < hi:
            mid = (lo + hi) // 2
            piece = tokenizer.decode(ids[:mid], skip_special_tokens=True)
            lo, hi = (lo, mid) if any(s in piece for s in stop) else (mid + 1, hi)
        n = lo
    return {"completion": text, "num_tokens": n, "finish_reason": reason}


def stop_string_seen(tokenizer, tails: list[list[int]], stop: Sequence[str]) -> list[bool]:
    """Whether each row's last tokens (``tails``) hold a stop string: the decode loop's early exit.

    Each tail must reach back far enough to hold a whole stop string (see :func:`tail_length`).
    """
    if not stop or not tails:  # batch_decode([]) would decode one empty sequence
        return [False] * len(tails)
    texts = tokenizer.batch_decode(tails, skip_special_tokens=True)
    return [any(s in text for s in stop) for text in texts]


def tail_length(stop: Sequence[str]) -> int:
    """Tokens to decode so that a stop string that just ended lies within them: every token that overlaps
    it holds at least one of its UTF-8 bytes, plus a margin for a tail that starts mid-character."""
    return max((len(s.encode()) for s in stop), default=0) + 8
