"""Mamba2 (SSD, Dao & Gu 2024) as a replacement for a transformers attention module.

This is transformers' ``Mamba2Mixer`` with the call signature of an attention module. On CUDA
with mamba-ssm installed transformers dispatches to its fused Triton kernels; on CPU raylin runs
its own chunked SSD (raylin/models/mixers/scan.py: quadratic only inside chunks of ``chunk_size``
tokens, several mixers batched in one pass), and one-token decoding steps update the recurrent
state directly through transformers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Mamba2Config
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer as HFMamba2Mixer

from raylin.models.decoding_cache import student_cache_from
from raylin.models.mixers.common import fast_path_applies, seed_rows, token_validity
from raylin.models.mixers.options import MixerOptions, TeacherShape
from raylin.models.mixers.scan import causal_depthwise_conv, ssd_scan


@dataclass(frozen=True)
class Mamba2Options(MixerOptions):
    """``plan.mamba2``: the inner width ``expand * hidden_size`` splits into heads of ``head_dim``
    (None: 64, or the largest power of two dividing a narrower inner width), in ``n_groups`` groups
    sharing B and C; ``chunk_size`` tokens per SSD chunk."""

    section: ClassVar[str] = "mamba2"
    expand: float = 1  # inner width = int(expand * hidden_size); it must split into heads of head_dim
    head_dim: int | None = None
    state_size: int = 64
    n_groups: int = 1
    chunk_size: int = 128
    conv_kernel: int = 4
    use_bias: bool = False

    def check(self) -> None:
        self._positive("head_dim", "state_size", "n_groups", "chunk_size", "conv_kernel")
        self._above_zero("expand")

    def build(self, teacher: TeacherShape, layer_idx: int, attention: nn.Module, shared: nn.Module | None) -> nn.Module:
        return Mamba2Mixer(mamba2_config(teacher.hidden_size, teacher.num_layers, self), layer_idx)


def mamba2_config(hidden_size: int, num_layers: int, options: Mamba2Options) -> Mamba2Config:
    """Mamba2Config for mixers of width ``hidden_size``; ValueError when the heads do not divide."""
    inner = int(options.expand * hidden_size)
    head_dim = options.head_dim or math.gcd(inner, 64)  # 64 unless the inner width is narrower
    if inner % head_dim:
        raise ValueError(
            f"plan.mamba2.head_dim: inner width expand*hidden = {inner} is not a multiple of head_dim={head_dim}; "
            f"choose a head_dim that divides {inner}."
        )
    if (inner // head_dim) % options.n_groups:
        raise ValueError(f"plan.mamba2.n_groups={options.n_groups} must divide the number of heads {inner // head_dim}.")
    return Mamba2Config(
        hidden_size=hidden_size,
        expand=options.expand,
        head_dim=head_dim,
        num_heads=inner // head_dim,
        n_groups=options.n_groups,
        state_size=options.state_size,
        conv_kernel=options.conv_kernel,
        chunk_size=options.chunk_size,
        use_bias=options.use_bias,
        use_conv_bias=True,
        num_hidden_layers=num_layers,
    )


def _stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tensors along a new first dimension (a view for a single one)."""
    return torch.stack(list(tensors)) if len(tensors) > 1 else tensors[0].unsqueeze(0)


def _stacked(mixers: Sequence[HFMamba2Mixer], get) -> torch.Tensor:
    """One small parameter of every mixer, stacked along a new first dimension."""
    return _stack([get(mixer) for mixer in mixers])


def stacked_mamba2_forward(
    mixers: Sequence[HFMamba2Mixer], inputs: Sequence[torch.Tensor], valid: torch.Tensor | None
) -> list[torch.Tensor]:
    """Run ``n`` Mamba2 mixers of one configuration at once on their own inputs, CPU fast path.

    ``inputs[i]`` (batch, length, hidden) goes through ``mixers[i]`` (a bidirectional mixer passes
    its sequence and the sequence reversed). The projections run per mixer (one large matmul each
    is faster on CPU than a batched one); the convolution, the scan and the norm run once for all n,
    the mixers folded into the batch. Returns the n outputs (batch, length, hidden). Equals
    transformers' ``torch_forward`` without a cache (tests/test_fast_paths.py).
    """
    first = mixers[0]
    count = len(mixers)
    batch, length, hidden = inputs[0].shape
    dtype = inputs[0].dtype
    inner, heads, head_dim = first.intermediate_size, first.num_heads, first.head_dim
    groups, state_size = first.n_groups, first.ssm_state_size
    mask = None if valid is None else valid[:, :, None].to(dtype)
    # 1. Input projections, padding zeroed first.
    projected = _stack(
        [mixer.in_proj(states if mask is None else states * mask) for mixer, states in zip(mixers, inputs)]
    )
    gate, x_b_c, dt = projected.split([inner, first.conv_dim, heads], dim=-1)
    # 2. Short causal convolution, channels last.
    conv_weight = _stacked(mixers, lambda m: m.conv1d.weight.squeeze(1))[:, None, None]
    conv_bias = None if first.conv1d.bias is None else _stacked(mixers, lambda m: m.conv1d.bias)[:, None, None]
    x_b_c = F.silu(causal_depthwise_conv(x_b_c, conv_weight, conv_bias))
    if mask is not None:
        x_b_c = x_b_c * mask[None]
    x, B, C = x_b_c.split([inner, groups * state_size, groups * state_size], dim=-1)
    # 3. Selective scan, the n mixers folded into the batch.
    dt = F.softplus(dt + _stacked(mixers, lambda m: m.dt_bias)[:, None, None].to(dt.dtype))
    low, high = first.time_step_limit
    if low > 0.0 or high != float("inf"):
        dt = dt.clamp(min=low, max=high)
    A = -torch.exp(_stacked(mixers, lambda m: m.A_log).float()).repeat_interleave(batch, dim=0)
    D = _stacked(mixers, lambda m: m.D).repeat_interleave(batch, dim=0)
    y = ssd_scan(
        x.reshape(count * batch, length, heads, head_dim),
        dt.reshape(count * batch, length, heads),
        A,
        B.reshape(count * batch, length, groups, state_size),
        C.reshape(count * batch, length, groups, state_size),
        first.chunk_size,
        D=D,
    ).reshape(count, batch, length, inner)
    # 4. Gated RMS norm (gate before the norm, per norm group) and output projection.
    norm = first.norm
    y = y * F.silu(gate.float())
    grouped = y.view(count, batch, length, inner // norm.group_size, norm.group_size)
    y = (grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)).view_as(y)
    y = (_stacked(mixers, lambda m: m.norm.weight)[:, None, None] * y).to(dtype)
    return [mixer.out_proj(y[index]) for index, mixer in enumerate(mixers)]


class Mamba2Mixer(HFMamba2Mixer):
    """Causal Mamba2 mixer called like an attention module; returns ``(output, None)``.

    On CPU without a decoding cache it runs ``stacked_mamba2_forward`` (raylin's fast path; a
    sequence shorter than ``chunk_size`` is one chunk of its own length). With a cache, on CUDA and
    inside ``reference_paths()`` it runs transformers' code: mamba-ssm's fused kernels where they
    are installed, else the reference PyTorch path, which pads every sequence to whole chunks, so on
    CPU a shorter sequence is given a chunk of its own length there too (chunking does not change
    the result, only the work).
    """

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        valid = token_validity(attention_mask, hidden_states.shape[1])
        cache = student_cache_from(kwargs)
        if cache is None and fast_path_applies(hidden_states):
            return stacked_mamba2_forward([self], [hidden_states], valid)[0], None
        configured = self.chunk_size
        if hidden_states.device.type == "cpu" and hidden_states.shape[1] < configured:
            self.chunk_size = hidden_states.shape[1]
        try:
            output = super().forward(hidden_states, cache_params=cache, attention_mask=valid)
        finally:
            self.chunk_size = configured
        return output, None

    @torch.no_grad()
    def seed_from_attention(self, source: dict[str, torch.Tensor | None]) -> list[tuple[str, str]]:
        """Copy the teacher's attention into this mixer where shapes allow (as MambaInLlama does).

        ``in_proj`` rows are [z | x | B | C | dt]: V -> x, K -> B, Q -> C; O -> ``out_proj``.
        ``source`` holds Q, K, V with one K/V head per query head. Returns (parameter name, note).
        """
        inner, groups_state = self.intermediate_size, self.n_groups * self.ssm_state_size
        rows = {"v": slice(inner, 2 * inner), "k": slice(2 * inner, 2 * inner + groups_state),
                "q": slice(2 * inner + groups_state, 2 * inner + 2 * groups_state)}
        return seed_rows(self, rows, source)

