"""The step-addressable batch order every training run and align task uses, whatever its task.

``GlobalBatches`` makes the order a function of the step: global batch ``s`` is a fixed set of
example indices (a seeded permutation per epoch), and worker ``r`` of ``w`` takes the r-th slice
of it. So the global batch does not depend on the number of workers, and a run resumed at step
``s`` reads exactly what an uninterrupted run would have read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GlobalBatches:
    """Which example indices global batch ``step`` holds, and each worker's share of it."""

    num_examples: int
    batch_size: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_examples < self.batch_size:
            raise ValueError(f"{self.num_examples} training examples cannot fill one global batch of {self.batch_size}.")

    @property
    def batches_per_epoch(self) -> int:
        return self.num_examples // self.batch_size  # the ragged tail of each epoch is dropped

    def indices(self, step: int) -> list[int]:
        epoch, position = divmod(step, self.batches_per_epoch)
        order = torch.randperm(self.num_examples, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        return order[position * self.batch_size : (position + 1) * self.batch_size].tolist()

    def shard(self, step: int, rank: int, world_size: int) -> list[int]:
        if self.batch_size % world_size:
            raise ValueError(f"Global batch {self.batch_size} does not split over {world_size} workers.")
        per_worker = self.batch_size // world_size
        return self.indices(step)[rank * per_worker : (rank + 1) * per_worker]
