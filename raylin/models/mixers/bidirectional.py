"""Bidirectional wrapper for causal mixers (``bimamba``, ``bimamba2``), as CALD does for speech.

A forward mixer reads the sequence left to right; a backward mixer reads each sequence reversed
within its real length (padding stays at the end, so real tokens never see it), and its output is
reversed back. The two outputs are summed and padding positions are zeroed. Each direction has
its own weights. On CPU two Mamba2 directions run as one pass (the reversed sequence stacked with
the forward one through every projection, the convolution and the scan), which halves the number
of operations a layer issues. Limits: right-padded batches (the layout transformers' encoders use).
"""

from __future__ import annotations

import torch
from torch import nn

from raylin.models.mixers.common import fast_path_applies, token_validity, zero_padding
from raylin.models.mixers.mamba2 import Mamba2Mixer, stacked_mamba2_forward


def reverse_within_length(hidden_states: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Reverse every sequence's first ``length`` positions, leaving padding in place.

    The permutation is its own inverse, so applying it twice restores the input.
    """
    if valid is None:
        return hidden_states.flip(1)
    seq_len = hidden_states.shape[1]
    positions = torch.arange(seq_len, device=hidden_states.device).unsqueeze(0)
    lengths = valid.sum(-1, keepdim=True)
    index = torch.where(positions < lengths, lengths - 1 - positions, positions)
    return hidden_states.gather(1, index.unsqueeze(-1).expand_as(hidden_states))


class BidirectionalMixer(nn.Module):
    """Sum of a forward and a time-reversed causal mixer; returns ``(output, None)``."""

    def __init__(self, forward_mixer: nn.Module, backward_mixer: nn.Module):
        super().__init__()
        self.forward_mixer = forward_mixer
        self.backward_mixer = backward_mixer
        self.fused = isinstance(forward_mixer, Mamba2Mixer) and isinstance(backward_mixer, Mamba2Mixer)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        valid = token_validity(attention_mask, hidden_states.shape[1])
        reversed_in = reverse_within_length(hidden_states, valid)
        if self.fused and fast_path_applies(hidden_states):
            both = stacked_mamba2_forward([self.forward_mixer, self.backward_mixer], [hidden_states, reversed_in], valid)
            output = both[0] + reverse_within_length(both[1], valid)
            return zero_padding(output, valid), None
        # The inner mixers take the 2D validity mask directly (token_validity passes 2D masks through).
        mask_2d = None if valid is None else valid.long()
        forward_out, _ = self.forward_mixer(hidden_states, attention_mask=mask_2d)
        backward_out, _ = self.backward_mixer(reversed_in, attention_mask=mask_2d)
        output = forward_out + reverse_within_length(backward_out, valid)
        return zero_padding(output, valid), None
