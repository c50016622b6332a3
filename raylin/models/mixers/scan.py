"""CPU operations of the state-space mixers, written as few large tensor operations.

transformers' PyTorch paths for Mamba and Mamba2 are references written for clarity: Mamba2's
chunked SSD repeats B and C for every head, pads every sequence to whole chunks and runs about
450 small operations for a four-layer bidirectional encoder; Mamba's CPU path hands the whole
sequence to a parallel scan that holds length x inner width x state at once. These functions compute
the same results (held to the references, outputs and gradients, by tests/test_fast_paths.py):

* ``causal_depthwise_conv``: the short causal convolution as ``kernel`` shifted multiply-adds on
  channels-last tensors (no transposes, no oneDNN call for a 4-tap filter);
* ``ssd_scan``: Mamba2's state-space duality with B and C kept per group (one score matrix per
  group, not per head), chunks only as long as the sequence, and the chunk-to-chunk recurrence as a
  loop over chunks (linear in their number, not quadratic);
* ``chunked_selective_scan``: Mamba's selective scan one chunk at a time, the state carried between
  chunks, so memory grows with the chunk and not with the sequence.

Everything here is plain autograd-traceable PyTorch; the CUDA kernels of mamba-ssm stay the GPU
path (the mixers only call these on CPU tensors).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from mambapy.pscan import pscan


def causal_depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv1d(x, weight, groups=channels, padding=kernel - 1)[..., :length]`` on ``x`` laid out
    (..., length, channels). ``weight`` is (..., channels, kernel) and broadcasts against ``x``'s
    leading dimensions with the length dimension left out (e.g. (n, 1, 1, channels, kernel) for
    ``x`` of shape (n, batch, length, channels)); ``bias`` is (..., channels) or None."""
    kernel = weight.shape[-1]
    length = x.shape[-2]
    padded = F.pad(x, (0, 0, kernel - 1, 0))
    # Tap kernel-1 multiplies the current token, tap k the token kernel-1-k steps back.
    out = padded[..., kernel - 1 : kernel - 1 + length, :] * weight[..., kernel - 1]
    for tap in range(kernel - 1):
        out = torch.addcmul(out, padded[..., tap : tap + length, :], weight[..., tap])
    return out if bias is None else out + bias


# exp(cum_t - cum_s) is computed as exp(cum_t) * exp(-cum_s) (cum counted from the chunk's start,
# so a position's factors never depend on later tokens and the scan stays exactly causal) while
# every chunk's total decay stays above exp(-FACTOR_LIMIT) (float32 keeps 1e12 of headroom beyond
# it for the sums of products); a call in which some chunk decays further uses the exact
# (chunk x chunk per head) decay matrix instead.
FACTOR_LIMIT = 60.0


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    return_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba2's selective scan from a zero state, in float32.

    Shapes: ``x`` (batch, length, heads, head_dim); ``dt`` (batch, length, heads), already through
    softplus and the time-step limits; ``A`` (batch, heads) negative decay rates (a (1, heads) row
    broadcasts); ``B``, ``C`` (batch, length, groups, state); ``D`` (batch, heads) or None.
    Returns y (batch, length, heads, head_dim) and, if asked, the final state (batch, heads,
    head_dim, state), the layout transformers' cache keeps. A sequence shorter than ``chunk_size``
    is one chunk of its own length. Every product is a matmul of one group's (position x position)
    scores against all of its heads at once; the per-head decay enters as factors on either side.
    Limits: no initial state (decoding continues through transformers' recurrent step).
    """
    batch, length, heads, head_dim = x.shape
    groups, state_size = B.shape[2], B.shape[3]
    per_group = heads // groups
    width = per_group * head_dim  # the columns one group's scores multiply
    chunk = min(chunk_size, length)
    chunks = -(-length // chunk)
    pad = chunks * chunk - length
    x = x.float()
    dt = dt.float()
    log_decay = dt * A[:, None, :].float()  # (batch, length, heads)
    B, C = B.float(), C.float()
    x_in = x
    if pad:
        # The padded tail carries no input and no decay, so it changes nothing before it.
        x_in = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        log_decay = F.pad(log_decay, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
    # 1. Chunks in the inputs' own layout: (batch, chunk index, position, group, head in group, ...).
    # dt and every per-head decay factor are folded into one (position x head) factor before they
    # touch the (position x head x head_dim) inputs, so each large tensor is scaled once.
    x_in = x_in.view(batch, chunks, chunk, groups, per_group, head_dim)
    dt = dt.view(batch, chunks, chunk, groups, per_group)
    cumulative = log_decay.view(batch, chunks, chunk, groups, per_group).cumsum(2)
    B = B.view(batch, chunks, chunk, groups, state_size).transpose(2, 3)  # (b, c, g, l, n)
    C = C.view(batch, chunks, chunk, groups, state_size).transpose(2, 3)

    def by_group(values: torch.Tensor) -> torch.Tensor:  # (b, c, l, g, j, p) -> (b, c, g, l, j*p)
        return values.reshape(batch, chunks, chunk, groups, width).transpose(2, 3)

    def by_head(values: torch.Tensor) -> torch.Tensor:  # the inverse
        return values.transpose(2, 3).reshape(batch, chunks, chunk, groups, per_group, head_dim)

    def per_column(factor: torch.Tensor) -> torch.Tensor:  # (b, c, g, j) -> (b, c, g, 1, j*p)
        return factor[..., None].expand(*factor.shape, head_dim).reshape(batch, chunks, groups, 1, width)

    # 2. Inside each chunk: y_t = sum_{s<=t} (C_t . B_s) exp(cum_t - cum_s) x_s dt_s.
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).tril()
    scores = (C @ B.transpose(-1, -2)).masked_fill(~causal, 0.0)  # (b, c, g, l, s), shared by a group's heads
    factored = float(cumulative[:, :, -1].detach().min()) >= -FACTOR_LIMIT
    if factored:
        # Kept as by_group(y) / exp(cum) until the end, when one multiply scales it back.
        y = scores @ by_group(x_in * (dt * (-cumulative).exp())[..., None])
    else:
        per_head = cumulative.permute(0, 1, 3, 4, 2)  # (b, c, g, j, l)
        decay = (per_head[..., :, None] - per_head[..., None, :]).masked_fill(~causal, float("-inf")).exp()
        x_dt = (x_in * dt[..., None]).permute(0, 1, 3, 4, 2, 5)  # (b, c, g, j, l, p)
        y = ((decay * scores[:, :, :, None]) @ x_dt).permute(0, 1, 4, 2, 3, 5)  # (b, c, l, g, j, p)
    state = None
    if chunks > 1 or return_final_state:
        # 3. The state each chunk hands on (b, c, g, n, j*p), and the recurrence from chunk to chunk.
        to_end = dt * (cumulative[:, :, -1:] - cumulative).exp()
        chunk_states = B.transpose(-1, -2) @ by_group(x_in * to_end[..., None])
        chunk_decay = per_column(cumulative[:, :, -1].exp())  # (b, c, g, 1, j*p)
        state = torch.zeros_like(chunk_states[:, 0])
        starts = []
        for index in range(chunks):
            starts.append(state)
            state = state * chunk_decay[:, index] + chunk_states[:, index]
        if chunks > 1:
            # 4. What each chunk's start state adds: C_t . start exp(cum_t).
            start = torch.stack(starts, dim=1)  # (b, c, g, n, j*p)
            if factored:
                y = y + C @ start
            else:
                y = y + by_head(C @ start) * cumulative.exp()[..., None]
    if factored:
        y = by_head(y) * cumulative.exp()[..., None]
    y = y.reshape(batch, chunks * chunk, heads, head_dim)[:, :length]
    if D is not None:
        y = y + x * D[:, None, :, None].float()
    if not return_final_state:
        return y
    final = state.view(batch, groups, state_size, per_group, head_dim).permute(0, 1, 3, 4, 2)
    return y, final.reshape(batch, heads, head_dim, state_size)


def chunked_selective_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    chunk_size: int,
    return_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba's selective scan from a zero state, ``chunk_size`` tokens at a time, in float32.

    Shapes: ``x`` and ``dt`` (batch, length, inner), ``dt`` already through softplus; ``A``
    (inner, state) negative; ``B``, ``C`` (batch, length, state); ``D`` (inner,) or None.
    h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t, y_t = C_t . h_t + D x_t. Inside a chunk the states
    come from mambapy's parallel scan; the last one seeds the next chunk, so at most
    batch x chunk x inner x state values are held at once. Returns y (batch, length, inner) and, if
    asked, the final state (batch, inner, state).
    """
    x, dt, B, C = x.float(), dt.float(), B.float(), C.float()
    A = A.float()
    state = None
    outputs = []
    for start in range(0, x.shape[1], chunk_size):
        part = slice(start, start + chunk_size)
        decay = torch.exp(dt[:, part, :, None] * A)  # (b, l, d, n)
        inputs = (dt[:, part] * x[:, part])[..., None] * B[:, part, None, :]
        if state is not None:
            # The carried state enters as part of the chunk's first input.
            inputs = torch.cat([inputs[:, :1] + decay[:, :1] * state[:, None], inputs[:, 1:]], dim=1)
        states = pscan(decay, inputs)
        outputs.append((states @ C[:, part, :, None]).squeeze(-1))
        state = states[:, -1]
    y = torch.cat(outputs, dim=1)
    if D is not None:
        y = y + x * D.float()
    return (y, state) if return_final_state else y
