"""One worker's batches in step order, each with the guidance that applies to it and its teacher
request already on its way.

``BatchFeed.get(step)`` is all the loop asks: it loads this worker's share of global batch
``step`` (the order comes from the step, so a resumed run sees the same batches), asks the guidance
schedule once which teacher and weights apply, sends the teacher request, and, with prefetch on,
also sends step+1's request so the teacher works while the student computes. Prefetch never
crosses a checkpoint: a saved trajectory teacher has seen exactly the steps before it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from raylin.config import RunConfig
from raylin.data.batch_order import GlobalBatches
from raylin.data.tasks import TaskData
from raylin.distill.guidance import GuidanceSchedule, StepGuidance
from raylin.teacher import TeacherOutput, TeacherRequest
from raylin.train.run_files import checkpoints_at


def model_inputs(batch: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A batch without its labels: what a model's forward takes; with ``dtype``, its floating inputs
    (speech features) in the dtype the model computes in (a bf16 engine does not cast them)."""
    return {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v
            for k, v in batch.items() if k != "labels"}


def count_tokens(batch: dict[str, torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
    """Real positions of a batch: tokens, Wav2Vec2 frames (``mask`` is its state mask), or mel frames
    for Whisper, whose inputs carry no mask."""
    if mask is not None:
        return mask.sum()
    inputs = next(iter(model_inputs(batch).values()))
    return torch.tensor(inputs.shape[0] * inputs.shape[-1], device=inputs.device)


@dataclass
class Batch:
    step: int
    example_ids: list[int]
    tensors: dict[str, torch.Tensor]  # on the worker's device, labels included
    guidance: StepGuidance

    @property
    def inputs(self) -> dict[str, torch.Tensor]:
        return model_inputs(self.tensors)


class BatchFeed:
    """This worker's batches and their teacher requests (see the module docstring)."""

    def __init__(self, config: RunConfig, data: TaskData, schedule: GuidanceSchedule, teachers,
                 device: torch.device, rank: int, world: int):
        self.config, self.data, self.schedule, self.teachers = config, data, schedule, teachers
        self.device, self.rank, self.world = device, rank, world
        self.batches = GlobalBatches(data.num_train, config.train.batch_size, config.data.seed)
        self._ahead: Batch | None = None
        self.teacher_wait_s = 0.0

    def get(self, step: int) -> Batch:
        batch = self._ahead if self._ahead is not None and self._ahead.step == step else self._load_and_ask(step)
        self._ahead = None
        if self.config.teacher_service.prefetch and not checkpoints_at(step + 1, self.config.train):
            self._ahead = self._load_and_ask(step + 1)
        return batch

    def teacher_output(self, batch: Batch) -> TeacherOutput | None:
        """The teacher's outputs for ``batch`` (None when this step has no teacher: task loss only).
        ``teacher_wait_s`` keeps how long this worker waited for them: the part of the teacher's
        work that prefetch did not hide behind the previous step."""
        self.teacher_wait_s = 0.0
        if batch.guidance.teacher is None:
            return None
        started = time.perf_counter()
        output = self.teachers.result(batch.step)
        self.teacher_wait_s = time.perf_counter() - started
        return output

    def _load_and_ask(self, step: int) -> Batch:
        idx = self.batches.shard(step, self.rank, self.world)
        tensors = {k: v.to(self.device) for k, v in self.data.train_batch(idx).items()}
        batch = Batch(step, idx, tensors, self.schedule.at(step))
        if batch.guidance.teacher is not None:
            labels = tensors["labels"].cpu().numpy() if "labels" in tensors else None
            self.teachers.submit(TeacherRequest(
                step, batch.guidance.teacher, {k: v.cpu().numpy() for k, v in batch.inputs.items()},
                labels=labels, example_ids=idx, update_teacher=batch.guidance.update_teacher))
        return batch
