"""Linformer self-attention (Wang et al., 2020) built from a teacher's attention module.

The teacher's Q, K, V (and, where the attention module owns it, output) projections are reused
as they are; the only new weights are the length projections E (keys) and F (values), each of
shape (max_length, k), initialised N(0, 1) as in CALD. For a sequence of real length n the keys
and values are projected along time with E[:n] and F[:n], divided by sqrt(n), and softmax
attention runs against those k projected keys and values: O(n k) time and memory.

Limits: bidirectional only (projecting along time mixes future tokens, so causal teachers are
rejected when the plan is built); sequences longer than ``max_length`` raise; padding is
handled for right-padded batches (padded keys and values are zeroed before projection and the
scale uses each sequence's real length).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from raylin.models.mixers.common import token_validity, zero_padding
from raylin.models.mixers.options import MixerOptions, ProjectionNames, TeacherShape

SHARE_MODES = ("none", "kv", "layer")


class LinformerProjection(nn.Module):
    """One (max_length, k) length projection; may be shared by several attention modules."""

    def __init__(self, max_length: int, k: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(max_length, k))

    def project(self, states: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """(batch, heads, n, d) -> (batch, heads, k, d), scaled by each sequence's real length."""
        n = states.shape[-2]
        if n > self.weight.shape[0]:
            raise ValueError(
                f"Sequence of {n} tokens is longer than the Linformer projections ({self.weight.shape[0]} rows); "
                "rebuild the student with a larger plan `linformer.max_length` or truncate the inputs."
            )
        weight = self.weight[:n].to(states.dtype)
        if valid is None:
            lengths = torch.full((states.shape[0],), n, device=states.device, dtype=states.dtype)
        else:
            lengths = valid.sum(-1).clamp(min=1).to(states.dtype)
        projected = torch.einsum("bhnd,nk->bhkd", states, weight)
        return projected / lengths.sqrt().view(-1, 1, 1, 1)


@dataclass(frozen=True)
class LinformerOptions(MixerOptions):
    """``plan.linformer``: ``k`` projected positions, projections shared by keys and values of a
    layer (``kv``), by no one (``none``: E and F) or by every layer (``layer``: one student-wide
    projection), ``max_length`` rows (None: the teacher's maximum positions)."""

    section: ClassVar[str] = "linformer"
    k: int = 256
    share: str = "kv"
    max_length: int | None = None

    def check(self) -> None:
        self._positive("k", "max_length")
        if self.share not in SHARE_MODES:
            raise ValueError(f"Unknown plan.linformer.share {self.share!r}; choose one of {SHARE_MODES}.")

    def rows(self, teacher: TeacherShape) -> int:
        """The projections' rows: the longest input the student accepts."""
        max_length = self.max_length or teacher.max_length
        if max_length is None:
            raise ValueError(f"plan.linformer.max_length: the {teacher.family} teacher has no maximum sequence length; "
                             "set plan.linformer.max_length to the longest input the student must accept.")
        return int(max_length)

    def check_against(self, teacher: TeacherShape) -> None:
        if self.k > self.rows(teacher):
            raise ValueError(
                f"plan.linformer.k={self.k} is above the maximum sequence length {self.rows(teacher)}: the projections "
                f"would be wider than any input. Use 1 <= plan.linformer.k <= {self.rows(teacher)}.")

    def build(self, teacher: TeacherShape, layer_idx: int, attention: nn.Module, shared: nn.Module | None) -> nn.Module:
        return LinformerSelfAttention(attention, teacher.projections, num_heads=teacher.num_heads,
                                      head_dim=teacher.head_dim, max_length=self.rows(teacher), k=self.k,
                                      share=self.share, shared_projection=shared, dropout=teacher.attention_dropout)

    @property
    def shares_across_layers(self) -> bool:
        return self.share == "layer"

    def shared_module(self, teacher: TeacherShape) -> nn.Module | None:
        return LinformerProjection(self.rows(teacher), self.k) if self.shares_across_layers else None


class LinformerSelfAttention(nn.Module):
    """Drop-in replacement for a transformers self-attention module.

    Accepts the arguments the host layer passes to its attention module and returns
    ``(output, None)`` like transformers attention modules do.
    """

    def __init__(
        self,
        teacher_attention: nn.Module,
        names: ProjectionNames,
        num_heads: int,
        head_dim: int,
        max_length: int,
        k: int,
        share: str,
        shared_projection: LinformerProjection | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        if share not in SHARE_MODES:
            raise ValueError(f"Unknown Linformer share mode {share!r}; choose one of {SHARE_MODES}.")
        self.names = names
        for name in (names.query, names.key, names.value, names.output):
            if name is not None:
                setattr(self, name, getattr(teacher_attention, name))
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scaling = head_dim**-0.5
        self.dropout = dropout
        self.share = share
        if share == "layer":
            if shared_projection is None:
                raise ValueError("share='layer' needs the student-wide shared projection.")
            # Held outside the module tree: the student owns the one shared tensor.
            object.__setattr__(self, "_shared_projection", shared_projection)
        else:
            self.E = LinformerProjection(max_length, k)
            if share == "none":
                self.F = LinformerProjection(max_length, k)

    def projections(self) -> tuple[LinformerProjection, LinformerProjection]:
        if self.share == "layer":
            return self._shared_projection, self._shared_projection
        if self.share == "kv":
            return self.E, self.E
        return self.E, self.F

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        return x.view(batch, seq_len, -1, self.head_dim).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        batch, seq_len, _ = hidden_states.shape
        valid = token_validity(attention_mask, seq_len)
        query = self._heads(getattr(self, self.names.query)(hidden_states))
        key = self._heads(zero_padding(getattr(self, self.names.key)(hidden_states), valid))
        value = self._heads(zero_padding(getattr(self, self.names.value)(hidden_states), valid))
        key_proj, value_proj = self.projections()
        key = key_proj.project(key, valid)
        value = value_proj.project(value, valid)
        output = F.scaled_dot_product_attention(
            query, key, value, dropout_p=self.dropout if self.training else 0.0, scale=self.scaling
        )
        output = output.transpose(1, 2).reshape(batch, seq_len, -1)
        if self.names.output is not None:
            output = getattr(self, self.names.output)(output)
        return output, None

    def seed_from_attention(self, source: dict[str, torch.Tensor | None]) -> list[tuple[str, str]]:
        """Nothing to seed: a Linformer keeps the teacher's Q, K, V and O under their own names,
        which the conversion copies like any shared weight."""
        return []


__all__ = ["LinformerOptions", "LinformerSelfAttention", "LinformerProjection", "SHARE_MODES"]
