"""One worker's batches in step order, each with the guidance that applies to it and its teacher
request already on its way: the batch feed of distillation and of the align stage alike.

``BatchFeed.get(step)`` is all a loop asks: it loads this worker's share of global batch ``step``
(raylin.data.batch_order: the order comes from the step, so a resumed run sees the same batches),
asks the guidance schedule once which teacher and weights apply, sends the teacher request, and,
with prefetch on, also sends step+1's request so the teacher works while the student computes.
Prefetch never reaches past the feed's last step, nor, in training, across a checkpoint: a saved
trajectory teacher has seen exactly the steps before it. ``held_out`` sends a held-out batch the
same way (the align stage scores its blocks on one).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from raylin.config import RunConfig
from raylin.data.batch_order import GlobalBatches
from raylin.data.task_data import TaskData
from raylin.distill.guidance import GuidanceSchedule, StepGuidance
from raylin.distill.losses import LossWeights
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
    example_ids: list[int] | None  # None: held-out examples (never cached: their ids are not training ids)
    tensors: dict[str, torch.Tensor]  # on the worker's device, labels included
    guidance: StepGuidance

    @property
    def inputs(self) -> dict[str, torch.Tensor]:
        return model_inputs(self.tensors)


class BatchFeed:
    """This worker's batches and their teacher requests (see the module docstring). ``steps``: the
    feed's last step + 1; ``prefetch_stops(step)``: a step that prefetch does not ask for early."""

    def __init__(self, data: TaskData, order: GlobalBatches, schedule: GuidanceSchedule, teachers,
                 device: torch.device, rank: int, world: int, steps: int, prefetch: bool,
                 prefetch_stops: Callable[[int], bool] | None = None):
        self.data, self.order, self.schedule, self.teachers = data, order, schedule, teachers
        self.device, self.rank, self.world = device, rank, world
        self.steps, self.prefetch, self.prefetch_stops = steps, prefetch, prefetch_stops
        self._ahead: Batch | None = None
        self.teacher_wait_s = 0.0

    @classmethod
    def for_training(cls, config: RunConfig, data: TaskData, schedule: GuidanceSchedule, teachers,
                     device: torch.device, rank: int, world: int) -> BatchFeed:
        """Distillation's feed: ``train.batch_size`` global batches, prefetch by ``teacher_service.prefetch``."""
        return cls(data, GlobalBatches(data.num_train, config.train.batch_size, config.data.seed), schedule, teachers,
                   device, rank, world, config.train.max_steps, config.teacher_service.prefetch,
                   partial(checkpoints_at, train=config.train))

    @classmethod
    def for_alignment(cls, config: RunConfig, data: TaskData, teachers) -> BatchFeed:
        """The align stage's feed, one per align task: whole ``align.batch_size`` batches in an order of
        their own (seed ``data.seed + 1``), on the CPU, each asking the target teacher, always prefetched."""
        align = config.align
        return cls(data, GlobalBatches(data.num_train, align.batch_size, config.data.seed + 1),
                   GuidanceSchedule("target", LossWeights()), teachers, torch.device("cpu"), 0, 1, align.steps, True)

    def get(self, step: int) -> Batch:
        batch = self._ahead if self._ahead is not None and self._ahead.step == step else self._load_and_ask(step)
        self._ahead = None
        if self.prefetch and step + 1 < self.steps and not (self.prefetch_stops and self.prefetch_stops(step + 1)):
            self._ahead = self._load_and_ask(step + 1)
        return batch

    def held_out(self, step: int, count: int) -> Batch:
        """The first ``count`` examples of the main held-out split as batch ``step`` (one no training
        batch uses), its teacher request sent."""
        return self._ask(Batch(step, None, self._on_device(self.data.eval_batch("", list(range(count)))),
                               self.schedule.at(step)))

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
        idx = self.order.shard(step, self.rank, self.world)
        return self._ask(Batch(step, idx, self._on_device(self.data.train_batch(idx)), self.schedule.at(step)))

    def _on_device(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in tensors.items()}

    def _ask(self, batch: Batch) -> Batch:
        if batch.guidance.teacher is not None:
            labels = batch.tensors["labels"].cpu().numpy() if "labels" in batch.tensors else None
            self.teachers.submit(TeacherRequest(
                batch.step, batch.guidance.teacher, {k: v.cpu().numpy() for k, v in batch.inputs.items()},
                labels=labels, example_ids=batch.example_ids, update_teacher=batch.guidance.update_teacher))
        return batch
