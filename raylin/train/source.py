"""The student a run starts from: the XATL conversion of its conversion source.

``config.conversion_source`` is the target teacher for target and hybrid guidance (the student
starts where the teacher it distils from ended) and the pretrained model otherwise. The align stage
(raylin.train.align) and every training worker build the same student from it.
"""

from __future__ import annotations

import torch

from raylin.config import RunConfig
from raylin.convert import convert
from raylin.data.tasks import load_task_model


def converted_student(config: RunConfig):
    """(student, transfer report, tokenizer or feature extractor), converted from the run's
    conversion source with its task head. Deterministic: the same on every rank and every call."""
    torch.manual_seed(config.train.seed)  # a new task head and new mixers start the same on every rank
    init_model, processor = load_task_model(config, config.conversion_source)
    student, report = convert(init_model, config.plan, processor)
    return student, report, processor
