"""Mamba (selective SSM, Gu & Dao 2023) as a replacement for a transformers attention module.

This is transformers' ``MambaMixer`` with the call signature of an attention module. Kernels:
on CUDA with mamba-ssm installed transformers dispatches to its fused kernels; on CPU raylin runs
the selective scan ``SCAN_CHUNK`` tokens at a time (raylin/models/mixers/scan.py), so memory grows
with the chunk, not the sequence (transformers' mambapy path holds length x inner width x state at
once). Decoding (a cache) and ``reference_paths()`` go through transformers' code; one-token
decoding steps update the recurrent state directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import MambaConfig
from transformers.models.mamba.modeling_mamba import MambaMixer as HFMambaMixer

from raylin.models.decoding_cache import student_cache_from
from raylin.models.mixers.common import fast_path_applies, seed_rows, token_validity
from raylin.models.mixers.options import MixerOptions, TeacherShape
from raylin.models.mixers.scan import causal_depthwise_conv, chunked_selective_scan

# Tokens per step of the CPU scan: the scan holds batch x SCAN_CHUNK x inner x state values.
SCAN_CHUNK = 128


@dataclass(frozen=True)
class MambaOptions(MixerOptions):
    """``plan.mamba``: inner width ``expand * hidden_size``, ``state_size`` per channel, ``dt_rank``
    ("auto": hidden_size / 16, rounded up)."""

    section: ClassVar[str] = "mamba"
    expand: float = 2  # inner width = int(expand * hidden_size); fractions allowed (2.5)
    state_size: int = 16
    conv_kernel: int = 4
    dt_rank: int | str = "auto"
    use_bias: bool = False

    def check(self) -> None:
        self._positive("state_size", "conv_kernel")
        self._above_zero("expand")
        if isinstance(self.dt_rank, str) and self.dt_rank != "auto" or isinstance(self.dt_rank, int) and self.dt_rank < 1:
            raise ValueError(f"plan.mamba.dt_rank must be 'auto' or an integer >= 1, got {self.dt_rank!r}.")

    def build(self, teacher: TeacherShape, layer_idx: int, attention: nn.Module, shared: nn.Module | None) -> nn.Module:
        return MambaMixer(mamba_config(teacher.hidden_size, teacher.num_layers, self), layer_idx)


def mamba_config(hidden_size: int, num_layers: int, options: MambaOptions) -> MambaConfig:
    """MambaConfig for mixers of width ``hidden_size``."""
    return MambaConfig(
        hidden_size=hidden_size,
        intermediate_size=int(options.expand * hidden_size),
        state_size=options.state_size,
        conv_kernel=options.conv_kernel,
        time_step_rank=math.ceil(hidden_size / 16) if options.dt_rank == "auto" else int(options.dt_rank),
        use_bias=options.use_bias,
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
        if cache is None and fast_path_applies(hidden_states):
            return self._cpu_forward(hidden_states, valid), None
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

    @torch.no_grad()
    def seed_from_attention(self, source: dict[str, torch.Tensor | None]) -> list[tuple[str, str]]:
        """Copy the teacher's V into ``in_proj``'s x rows and O into ``out_proj`` where shapes allow.

        ``in_proj`` rows are [x | z]; B and C come from ``x_proj`` and are shared across channels,
        so Q and K have nowhere to go. Returns (parameter name, note) for every parameter written.
        """
        return seed_rows(self, {"v": slice(0, self.intermediate_size)}, source)

    def _cpu_forward(self, hidden_states: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """transformers' ``slow_forward`` without a cache, channels last, with the chunked scan."""
        dtype = hidden_states.dtype
        mask = None if valid is None else valid[:, :, None].to(dtype)
        # 1. Gated projection, padding zeroed first.
        projected = self.in_proj(hidden_states if mask is None else hidden_states * mask)
        x, gate = projected.chunk(2, dim=-1)
        # 2. Short causal convolution.
        x = self.act(causal_depthwise_conv(x, self.conv1d.weight.squeeze(1), self.conv1d.bias))
        if mask is not None:
            x = x * mask
        # 3. Input-dependent step, B and C; the chunked selective scan.
        time_step, B, C = self.x_proj(x).split([self.time_step_rank, self.ssm_state_size, self.ssm_state_size], dim=-1)
        dt = F.softplus(self.dt_proj(time_step).float())
        A = -torch.exp(self.A_log.float())
        y = chunked_selective_scan(x, dt, A, B, C, self.D, SCAN_CHUNK)
        y = y * self.act(gate.float())
        # 4. Output projection.
        return self.out_proj(y.to(dtype))
