"""Everything a training worker builds before its first step: the student (converted, then given
its aligned blocks when the align stage ran), the task data, and the optimizer with its schedule."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raylin.config import RunConfig
from raylin.data.task_data import TaskData, load_task_data
from raylin.distill.freezing import LossImprovementThreshold
from raylin.distill.guidance import GuidanceSchedule
from raylin.optim import adamw, copied_and_new
from raylin.train.align import load_aligned
from raylin.train.student_build import converted_student, sharded_student


@dataclass
class RunParts:
    schedule: GuidanceSchedule
    student: torch.nn.Module  # on the worker's device
    report: object  # the XATL transfer report
    processor: object  # tokenizer or feature extractor
    data: TaskData


def build_run(config: RunConfig, device: torch.device, deepspeed_config: dict) -> RunParts:
    """Student (converted, then aligned when the align stage ran), data and task pieces for one
    worker. The same on every rank. Under ZeRO-3 the student is built already partitioned
    (raylin.train.student_build.sharded_student): no worker holds the whole model."""
    if config.train.zero_stage == 3:
        student, report, processor = sharded_student(config, deepspeed_config)
    else:
        student, report, processor = converted_student(config)
    if config.align.enabled:
        load_aligned(student, config)
    data = load_task_data(config, processor)
    return RunParts(config.schedule, student.to(device), report, processor, data)


def linear_warmup_decay(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / max(warmup, 1)
    return max(0.0, (total - step) / max(total - warmup, 1))


def build_optimizer(student: torch.nn.Module, report, config: RunConfig):
    """(AdamW, LambdaLR, LIT or None). Two parameter groups: the copied weights (XATL-frozen until
    LIT unfreezes them, their rate scaled by LIT's multiplier) and the rest; empty groups are left
    out (DeepSpeed drops them: teacher fine-tuning, for one, copies everything). With
    ``freeze.until: end`` the copied weights stay out of the optimizer and never get gradients."""
    copied, others = copied_and_new(student, report)
    lit = None
    if config.freeze.copied and config.freeze.until == "end":  # frozen for good: no gradients, no optimizer state
        for param in copied:
            param.requires_grad_(False)
        copied = []
    elif config.freeze.copied:
        lit = LossImprovementThreshold(**vars(config.freeze.lit))
        for param in copied:  # zero gradients while frozen, so Adam's moments stay fresh
            param.register_hook(lambda grad: grad if not lit.frozen else torch.zeros_like(grad))
    train = config.train
    main = lambda step: linear_warmup_decay(step, train.warmup_steps, train.max_steps)
    copied_lambda = (lambda step: main(step) * lit.lr_multiplier(step)) if lit else main
    groups, lambdas = [], []
    for params, schedule_fn in ((others, main), (copied, copied_lambda)):
        if params:
            groups.append({"params": params})
            lambdas.append(schedule_fn)
    optimizer = adamw(groups, lr=train.lr, weight_decay=train.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas), lit
