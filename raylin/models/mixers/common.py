"""Pieces every mixer shares: turning the mask a transformers layer hands its attention module
into a per-token validity mask, zeroing padding, and the switch between raylin's CPU fast paths
and transformers' reference code."""

from __future__ import annotations

import contextlib

import torch


def token_validity(attention_mask: torch.Tensor | None, seq_len: int) -> torch.Tensor | None:
    """Return a (batch, seq_len) bool mask, True on real tokens, from the mask an attention
    module receives, or None when every token is real.

    transformers builds masks for its attention modules in several shapes: None (sdpa, no
    padding), a 2D (batch, kv_len) 0/1 mask (flash attention), or a 4D (batch, 1, q_len, kv_len)
    mask that is boolean (True = attend) or additive float (0 = attend, large negative = masked).
    Bidirectional masks repeat the key-padding row for every query; causal masks are widest on the
    last query row, so that row tells which keys are padding. The last ``seq_len`` keys are the
    tokens of this call (earlier ones are cached context during decoding).
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        valid = attention_mask[:, -seq_len:].bool()
    elif attention_mask.dim() == 4:
        last_row = attention_mask[:, 0, -1, -seq_len:]
        valid = last_row if last_row.dtype == torch.bool else last_row == 0
    else:
        raise ValueError(
            f"Cannot read token validity from an attention mask of shape {tuple(attention_mask.shape)}: "
            "expected (batch, kv_len) or (batch, 1, q_len, kv_len). Use attn_implementation='sdpa' or 'eager'."
        )
    return None if bool(valid.all()) else valid


def zero_padding(hidden_states: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Zero the hidden states of padding tokens (so they carry nothing into a scan)."""
    if valid is None:
        return hidden_states
    return hidden_states * valid.unsqueeze(-1).to(hidden_states.dtype)


_FAST_PATHS = {"enabled": True}


@contextlib.contextmanager
def reference_paths():
    """Run every mixer through transformers' reference PyTorch code instead of raylin's CPU fast
    paths (raylin/models/mixers/scan.py) inside the block: what tests and the speed benchmark
    compare the fast paths against."""
    previous = _FAST_PATHS["enabled"]
    _FAST_PATHS["enabled"] = False
    try:
        yield
    finally:
        _FAST_PATHS["enabled"] = previous


def fast_path_applies(hidden_states: torch.Tensor) -> bool:
    """Whether raylin's CPU fast paths run: on CPU tensors, outside ``reference_paths()``. CUDA
    tensors keep transformers' dispatch to the mamba-ssm kernels."""
    return _FAST_PATHS["enabled"] and hidden_states.device.type == "cpu"


def seed_rows(mixer: torch.nn.Module, rows: dict[str, slice], source: dict[str, torch.Tensor | None]) -> list[tuple[str, str]]:
    """Copy ``source[key]`` into ``mixer.in_proj.weight[rows[key]]`` where shapes match, and O into
    ``out_proj``; the (parameter name, note) of every parameter written."""
    written = []
    for key, row_slice in rows.items():
        target = mixer.in_proj.weight[row_slice]
        if source[key] is not None and target.shape == source[key].shape:
            target.copy_(source[key])
            written.append(f"rows {row_slice.start}:{row_slice.stop} <- {key.upper()}")
    notes = [("in_proj.weight", ", ".join(written))] if written else []
    if source.get("o") is not None and mixer.out_proj.weight.shape == source["o"].shape:
        mixer.out_proj.weight.copy_(source["o"])
        notes.append(("out_proj.weight", "O"))
    return notes
