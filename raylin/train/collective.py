"""The few collectives the training loop and evaluation need, a no-op without a process group."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sum_across_workers(value: torch.Tensor) -> torch.Tensor:
    """``value`` summed over the workers (a detached copy; ``value`` itself is unchanged)."""
    value = value.detach().clone()
    if world_size() > 1:
        dist.all_reduce(value)
    return value


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def gather_across_workers(value: torch.Tensor) -> torch.Tensor:
    """Every worker's ``value`` (same shape on each), stacked in rank order."""
    if world_size() == 1:
        return value.detach().clone().unsqueeze(0)
    parts = [torch.empty_like(value) for _ in range(world_size())]
    dist.all_gather(parts, value.detach().contiguous())
    return torch.stack(parts)
