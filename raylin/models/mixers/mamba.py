"""Mamba (selective SSM, Gu & Dao 2023) as a replacement for a transformers attention module.

This is transformers' ``MambaMixer`` with the call signature of an attention module. Kernels:
on CUDA with mamba-ssm installed transformers dispatches to its fused kernels; on CPU the scan
runs as mambapy's parallel scan (``use_mambapy=True``), never a per-timestep Python loop, except
one-token decoding steps, which update the recurrent state directly.
"""

from __future__ import annotations

import math

import torch
from transformers import MambaConfig
from transformers.models.mamba.modeling_mamba import MambaMixer as HFMambaMixer

from raylin.models.cache import student_cache_from
from raylin.models.mixers.common import token_validity


def mamba_config(hidden_size: int, num_layers: int, options: dict) -> MambaConfig:
    """MambaConfig for mixers of width ``hidden_size``; ``options`` come from the plan's ``mamba``."""
    expand = options.get("expand", 2)
    dt_rank = options.get("dt_rank", "auto")
    return MambaConfig(
        hidden_size=hidden_size,
        intermediate_size=int(expand * hidden_size),
        state_size=options.get("state_size", 16),
        conv_kernel=options.get("conv_kernel", 4),
        time_step_rank=math.ceil(hidden_size / 16) if dt_rank == "auto" else int(dt_rank),
        use_bias=options.get("use_bias", False),
        use_conv_bias=True,
        num_hidden_layers=num_layers,
        use_mambapy=True,
    )


class MambaMixer(HFMambaMixer):
    """Causal Mamba mixer called like an attention module; returns ``(output, None)``."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        seq_len = hidden_states.shape[1]
        valid = token_validity(attention_mask, seq_len)
        cache = student_cache_from(kwargs)
        if cache is not None and seq_len > 1 and cache.has_previous_state(self.layer_idx):
            # transformers' parallel scan starts from a zero state, so a multi-token chunk that
            # continues a cached state is decoded token by token (decoding only, never training).
            steps = [
                super(MambaMixer, self).forward(
                    hidden_states[:, t : t + 1], cache_params=cache, attention_mask=None if valid is None else valid[:, t : t + 1]
                )
                for t in range(seq_len)
            ]
            return torch.cat(steps, dim=1), None
        return super().forward(hidden_states, cache_params=cache, attention_mask=valid), None
