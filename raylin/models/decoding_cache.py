"""The decoding cache of a causal student: a fixed-size recurrent state for every mixer layer and
an ordinary growing key/value cache for the layers that kept attention.

transformers' ``Cache`` already holds per-layer ``LinearAttentionLayer`` (conv + SSM state) and
``DynamicLayer`` (keys/values) objects, and its Mamba mixers read and write them. What it lacks
for a student whose first layer may be a mixer is a token count: ``get_seq_length`` normally asks
the first attention layer, and a student need not have one. This cache counts tokens itself;
``RaylinStudent.forward`` advances it after every call.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer, LinearAttentionLayer


class StudentCache(Cache):
    """Per-layer cache for a causal student. ``mixer_layers[i]`` says whether layer i is a mixer."""

    def __init__(self, mixer_layers: list[bool]):
        layers = [LinearAttentionLayer() if is_mixer else DynamicLayer() for is_mixer in mixer_layers]
        super().__init__(layers=layers)
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def advance(self, num_tokens: int) -> None:
        self.seen_tokens += num_tokens

    def state_bytes(self) -> int:
        """Bytes held by every cached tensor: fixed for mixer layers, growing for attention layers."""
        total = 0
        for layer in self.layers:
            tensors: list[torch.Tensor | None] = []
            if isinstance(layer, LinearAttentionLayer):
                tensors += list(layer.conv_states.values()) + list(layer.recurrent_states.values())
            else:
                tensors += [getattr(layer, "keys", None), getattr(layer, "values", None)]
            total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
        return total


def student_cache_from(kwargs: dict) -> StudentCache | None:
    """The StudentCache a host layer passed to its attention module, if any (Llama passes
    ``past_key_values``, GPT-NeoX ``layer_past``). Plain transformers caches are ignored: a
    training forward may build a DynamicCache the mixers have no use for."""
    for name in ("past_key_values", "layer_past", "past_key_value"):
        cache = kwargs.get(name)
        if isinstance(cache, StudentCache):
            return cache
    return None
