"""Mamba2 (SSD, Dao & Gu 2024) as a replacement for a transformers attention module.

This is transformers' ``Mamba2Mixer`` with the call signature of an attention module. On CUDA
with mamba-ssm installed transformers dispatches to its fused Triton kernels; on CPU it runs the
chunked SSD algorithm in PyTorch (quadratic only inside chunks of ``chunk_size`` tokens), and
one-token decoding steps update the recurrent state directly.
"""

from __future__ import annotations

import math

import torch
from transformers import Mamba2Config
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer as HFMamba2Mixer

from raylin.models.cache import student_cache_from
from raylin.models.mixers.common import token_validity


def mamba2_config(hidden_size: int, num_layers: int, options: dict) -> Mamba2Config:
    """Mamba2Config for mixers of width ``hidden_size``; ``options`` come from the plan's ``mamba2``.

    The inner width ``expand * hidden_size`` must split into heads of ``head_dim`` (default 64,
    or the largest power of two dividing a narrower inner width).
    """
    expand = options.get("expand", 1)
    inner = int(expand * hidden_size)
    head_dim = options.get("head_dim", math.gcd(inner, 64))  # 64 unless the inner width is narrower
    if inner % head_dim:
        raise ValueError(
            f"mamba2: inner width expand*hidden = {inner} is not a multiple of head_dim={head_dim}; "
            f"choose a head_dim that divides {inner}."
        )
    n_groups = options.get("n_groups", 1)
    if (inner // head_dim) % n_groups:
        raise ValueError(f"mamba2: n_groups={n_groups} must divide the number of heads {inner // head_dim}.")
    return Mamba2Config(
        hidden_size=hidden_size,
        expand=expand,
        head_dim=head_dim,
        num_heads=inner // head_dim,
        n_groups=n_groups,
        state_size=options.get("state_size", 64),
        conv_kernel=options.get("conv_kernel", 4),
        chunk_size=options.get("chunk_size", 128),
        use_bias=options.get("use_bias", False),
        use_conv_bias=True,
        num_hidden_layers=num_layers,
    )


class Mamba2Mixer(HFMamba2Mixer):
    """Causal Mamba2 mixer called like an attention module; returns ``(output, None)``.

    On CPU a sequence shorter than ``chunk_size`` runs as a single chunk of its own length: the
    PyTorch SSD path pads every sequence to a multiple of the chunk size, so a 64-token batch with
    the default 128-token chunks would pay for 128 (its intra-chunk part grows with the square).
    Chunking does not change the result (the padded tail carries no input and no decay), only the
    work; the fused CUDA kernels choose their own blocks and are left alone.
    """

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        valid = token_validity(attention_mask, hidden_states.shape[1])
        configured = self.chunk_size
        if hidden_states.device.type == "cpu" and hidden_states.shape[1] < configured:
            self.chunk_size = hidden_states.shape[1]
        try:
            output = super().forward(hidden_states, cache_params=student_cache_from(kwargs), attention_mask=valid)
        finally:
            self.chunk_size = configured
        return output, None
