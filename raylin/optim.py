"""The optimizer every raylin training step uses (the student's, the align stage's and the trajectory
teacher's): AdamW on torch's fused kernel where it has one; and the split of a converted student's
parameters into copied and new ones that distillation's and alignment's parameter groups start from."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import torch

from raylin.convert import TransferReport, freezable_copied_parameters

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


class CopiedAndNew(NamedTuple):
    copied: list[torch.nn.Parameter]  # the weights XATL copied from the teacher (the ones freezing applies to)
    new: list[torch.nn.Parameter]  # the rest: new mixer weights, and whatever the conversion did not copy


def copied_and_new(student: torch.nn.Module, report: TransferReport) -> CopiedAndNew:
    """The student's parameters in their order, split by whether the conversion copied them
    (``report``): distillation puts the two in separate groups (frozen and LIT-scaled copied
    weights), alignment trains the new ones only (``align.parameters: new``)."""
    copied = freezable_copied_parameters(student, report)
    copied_ids = {id(p) for p in copied}
    return CopiedAndNew(copied, [p for p in student.parameters() if id(p) not in copied_ids])
