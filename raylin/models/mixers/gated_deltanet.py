"""Gated DeltaNet (Yang, Kautz & Hatamizadeh 2025) as a replacement for a transformers attention module.

This is transformers' ``Qwen3NextGatedDeltaNet`` (the mixer Qwen3-Next ships) with the call
signature of an attention module. Its gated delta rule runs as transformers' chunked PyTorch code
(chunks of 64 tokens, a triangular solve inside each) for whole sequences and as its recurrent
form for one-token decoding steps; with flash-linear-attention installed on CUDA transformers
dispatches both to fla's Triton kernels. The recurrent state per layer is
``heads × head_dim × head_dim`` plus a ``conv_kernel``-token convolution window, whatever the
context length.

Layout of the projections (what ``seed_from_attention`` writes): ``in_proj_qkvz`` holds, per key
head, [q | k | v | z] rows of ``head_dim`` each (one value head per key head here); ``in_proj_ba``
holds, per key head, [b | a] (the write strength β = sigmoid(b) and the decay's time step a);
``out_proj`` reads the gated-normed values. Limits: one value head per key head and equal key and
value head widths, so the teacher's Q, K, V and O map onto the delta rule one to one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers import Qwen3NextConfig
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

from raylin.models.decoding_cache import student_cache_from
from raylin.models.mixers.common import token_validity
from raylin.models.mixers.options import MixerOptions, TeacherShape

@dataclass(frozen=True)
class GatedDeltaNetOptions(MixerOptions):
    """``plan.gated_deltanet``: ``num_heads`` and ``head_dim`` (None: the teacher's attention heads),
    a ``conv_kernel``-token short convolution."""

    section: ClassVar[str] = "gated_deltanet"
    num_heads: int | None = None
    head_dim: int | None = None
    conv_kernel: int = 4

    def check(self) -> None:
        self._positive("num_heads", "head_dim", "conv_kernel")

    def build(self, teacher: TeacherShape, layer_idx: int, attention: nn.Module, shared: nn.Module | None) -> nn.Module:
        return GatedDeltaNetMixer(gated_deltanet_config(teacher, self), layer_idx)


def gated_deltanet_config(teacher: TeacherShape, options: GatedDeltaNetOptions) -> Qwen3NextConfig:
    """Qwen3NextConfig for Gated DeltaNet mixers in a teacher of this shape."""
    heads, width = options.num_heads or teacher.num_heads, options.head_dim or teacher.head_dim
    return Qwen3NextConfig(
        hidden_size=teacher.hidden_size,
        num_hidden_layers=teacher.num_layers,
        layer_types=["linear_attention"] * teacher.num_layers,
        linear_num_key_heads=heads,
        linear_num_value_heads=heads,
        linear_key_head_dim=width,
        linear_value_head_dim=width,
        linear_conv_kernel_dim=options.conv_kernel,
        hidden_act="silu",
        rms_norm_eps=teacher.rms_norm_eps,
    )


class GatedDeltaNetMixer(Qwen3NextGatedDeltaNet):
    """Causal Gated DeltaNet mixer called like an attention module; returns ``(output, None)``.

    Padding tokens are zeroed before the projections, so they write nothing into the state (a
    zero key adds nothing) and left-padded prompts decode as unpadded ones would.
    """

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        valid = token_validity(attention_mask, hidden_states.shape[1])
        cache = student_cache_from(kwargs)
        output = super().forward(hidden_states, cache_params=cache, attention_mask=valid)
        return output, None

    @torch.no_grad()
    def seed_from_attention(self, source: dict[str, torch.Tensor | None]) -> list[tuple[str, str]]:
        """Copy the teacher's Q, K, V (one K/V head per query head) and O into this mixer.

        Returns (parameter name, which teacher weights seeded it) for every parameter written;
        nothing is written where shapes differ (other head counts or widths than the teacher's).
        """
        heads, width = self.num_k_heads, self.head_k_dim
        per_head = self.in_proj_qkvz.weight.view(heads, 4, width, -1)  # [q | k | v | z] per head
        notes = []
        if all(source[key] is not None and source[key].shape == (heads * width, per_head.shape[-1]) for key in "qkv"):
            for index, key in enumerate("qkv"):
                per_head[:, index].copy_(source[key].view(heads, width, -1))
            notes.append(("in_proj_qkvz.weight", "Q, K, V rows per head"))
        if source.get("o") is not None and self.out_proj.weight.shape == source["o"].shape:
            self.out_proj.weight.copy_(source["o"])
            notes.append(("out_proj.weight", "O"))
        return notes
