"""Token conventions every stage shares: one BOS per prompt, and every id that ends a completion.

Sampling (both backends), training and evaluation tokenize prompts through :func:`encode_prompt` and stop
on :func:`stop_token_ids`, so a prompt is the same token sequence wherever it is used and a completion
ends where the model's own generation config says a turn ends.
"""

from __future__ import annotations

from pathlib import Path


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of ``prompt`` with exactly one BOS.

    A rendered chat template already holds the BOS text (Llama 3: ``<|begin_of_text|>``); tokenizing it
    with the tokenizer's special tokens would add a second one. Plain prompts get the tokenizer's usual
    special tokens (the tiny model's ``<s>``; none for Qwen or SmolLM2).
    """
    bos = tokenizer.bos_token
    if bos and prompt.startswith(bos):
        return list(tokenizer(prompt, add_special_tokens=False).input_ids)
    return list(tokenizer(prompt).input_ids)


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """:func:`encode_prompt` of each prompt."""
    return [encode_prompt(tokenizer, p) for p in prompts]


def batches_by_length(tokenizer, prompts: list[str], batch_size: int) -> list[list[int]]:
    """Prompt indices sorted by token length (stable) and cut into ``batch_size`` batches: the batches one
    ``factory.sampling.hf.generate`` call decodes, so a batch decoded whole elsewhere (a worker process,
    a Ray replica) draws the samples one process draws."""
    lengths = [len(ids) for ids in encode_prompts(tokenizer, list(prompts))]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def turn_end_token(tokenizer) -> str | None:
    """The special token the chat template closes an assistant turn with (``<|im_end|>``,
    ``<|eot_id|>``), or None without a chat template or when the turn ends with no special token."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "XQXQ"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": marker}], tokenize=False
        )
    except Exception:  # noqa: BLE001 - templates that refuse this conversation have no usable end token
        return None
    after = text[text.rfind(marker) + len(marker) :]
    specials = sorted(tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()), key=len, reverse=True)
    stripped = after.lstrip()
    return next((tok for tok in specials if tok and stripped.startswith(tok)), None)


def stop_token_ids(tokenizer, model_path: str | Path | None = None) -> list[int]:
    """Every token id that ends a completion: the tokenizer's EOS, each ``eos_token_id`` of the model's
    generation config (Qwen base models: ``<|endoftext|>`` and ``<|im_end|>``), and the chat template's
    end-of-turn token. Sorted, without duplicates."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if model_path is not None:
        ids.update(_generation_config_eos(model_path))
    end = turn_end_token(tokenizer)
    if end is not None:
        end_id = tokenizer.convert_tokens_to_ids(end)
        if end_id is not None and end_id != tokenizer.unk_token_id:
            ids.add(int(end_id))
    return sorted(ids)


def completion_end_ids(tokenizer, prompts: list[str]) -> list[int]:
    """The token each training completion ends with: the end-of-turn token after a chat prompt (what the
    model writes to close its turn: ``<|im_end|>``, ``<|eot_id|>``), else the tokenizer's EOS."""
    eos = int(tokenizer.eos_token_id)
    end = turn_end_token(tokenizer)
    end_id = tokenizer.convert_tokens_to_ids(end) if end is not None else None
    if end_id is None or end_id == tokenizer.unk_token_id:
        return [eos] * len(prompts)
    # A chat prompt ends with the template's generation prompt (the assistant header).
    header = tokenizer.apply_chat_template(
        [{"role": "user", "content": "a"}], tokenize=False, add_generation_prompt=True
    )
    tail = header[header.rfind("a") + 1 :].strip()[-16:]
    return [int(end_id) if tail and p.rstrip().endswith(tail) else eos for p in prompts]


def _generation_config_eos(model_path) -> list[int]:
    """``eos_token_id`` of a model's ``generation_config.json`` (an int or a list); [] when there is none."""
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(str(model_path))
    except (OSError, ValueError):
        return []
    eos = config.eos_token_id
    if eos is None:
        return []
    return [int(x) for x in (eos if isinstance(eos, (list, tuple)) else [eos])]
