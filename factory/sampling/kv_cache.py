"""The decode loop's KV cache and attention: a preallocated cache and grouped-query attention without copies.

transformers' ``DynamicCache`` concatenates every layer's keys and values at every step, and its SDPA
path repeats the key/value heads for grouped-query attention whenever there is a padding mask (every
batched decode step). At 128 rows and a few hundred tokens these two copies cost more than the model's
matmuls on a CPU. Here each layer writes into a buffer sized for the prompt plus ``max_new_tokens`` once,
and attention runs with SDPA's ``enable_gqa`` (the same numbers as repeating the heads).
"""

from __future__ import annotations

import contextlib

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

ATTENTION = "restem_sdpa"


class BufferLayer(DynamicLayer):
    """One attention layer's keys and values in a buffer of ``capacity`` positions; reads are views."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        rows, heads, _, dim = key_states.shape
        self._keys = key_states.new_empty(rows, heads, self.capacity, dim)
        self._values = value_states.new_empty(
            rows, value_states.shape[1], self.capacity, value_states.shape[-1]
        )
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache buffer overflow: {end} positions, capacity {self.capacity}")
        self._keys[:, :, self.length : end] = key_states
        self._values[:, :, self.length : end] = value_states
        self.length = end
        self._refresh()
        return self.keys, self.values

    def _refresh(self) -> None:
        self.keys = self._keys[:, :, : self.length]
        self.values = self._values[:, :, : self.length]

    def get_seq_length(self) -> int:
        return self.length

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._keys = self._copy_rows(self._keys, lambda x: x.repeat_interleave(repeats, dim=0))
            self._values = self._copy_rows(self._values, lambda x: x.repeat_interleave(repeats, dim=0))
            self._refresh()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._keys = self._copy_rows(self._keys, lambda x: x.index_select(0, indices))
            self._values = self._copy_rows(self._values, lambda x: x.index_select(0, indices))
            self._refresh()

    def _copy_rows(self, buffer: torch.Tensor, rows) -> torch.Tensor:
        """A new buffer with the filled positions of ``rows(filled)`` (the empty tail is not copied)."""
        filled = rows(buffer[:, :, : self.length])
        new = buffer.new_empty(filled.shape[0], buffer.shape[1], self.capacity, buffer.shape[-1])
        new[:, :, : self.length] = filled
        return new

    def reset(self) -> None:
        self.length = 0
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the decode loop's KV cache is never cropped")


def make_cache(config, *, capacity: int) -> Cache:
    """A preallocated cache of ``capacity`` positions per layer when every layer attends to all positions;
    else (sliding-window or linear-attention layers) transformers' ``DynamicCache``."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    sliding = getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True)
    if sliding or any(t != "full_attention" for t in types):
        return DynamicCache(config=config)
    return Cache(layers=[BufferLayer(capacity) for _ in types])


def gqa_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' SDPA attention, with grouped-query attention done by SDPA itself on the CPU.

    On CUDA a masked ``enable_gqa`` call falls back to SDPA's math kernel, so there (and without groups)
    this is exactly transformers' ``sdpa_attention_forward``.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if (
        groups == 1
        or attention_mask is None
        or query.device.type != "cpu"
        or kwargs.get("position_bias") is not None
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def decode_attention(model):
    """Runs ``model`` with :func:`gqa_sdpa_attention` when it uses SDPA; any other implementation (eager,
    flash attention) is left alone. The model's setting is restored afterwards."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = model.config
    before = getattr(config, "_attn_implementation", None)
    if before != "sdpa":
        yield
        return
    AttentionInterface.register(ATTENTION, gqa_sdpa_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    config._attn_implementation = ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before
