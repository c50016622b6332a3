"""The student a run starts from: the XATL conversion of its conversion source.

``config.conversion_source`` is the target teacher for target and hybrid guidance (the student
starts where the teacher it distils from ended) and the pretrained model otherwise. Every training
worker builds the same student from it; an align task (raylin.train.align) builds only the blocks
it aligns (``block_local_student``), each block exactly as in the whole student.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig

from raylin.config import RunConfig
from raylin.convert import convert
from raylin.data.tasks import load_task_model
from raylin.models.families import BlockSubset, family_for_config
from raylin.models.teachers import resolve_teacher_path


def converted_student(config: RunConfig):
    """(student, transfer report, tokenizer or feature extractor), converted from the run's
    conversion source with its task head. Deterministic: the same on every rank and every call."""
    torch.manual_seed(config.train.seed)  # a new task head and new mixers start the same on every rank
    init_model, processor = load_task_model(config, config.conversion_source)
    student, report = convert(init_model, config.plan, processor)
    return student, report, processor


def block_local_student(config: RunConfig, layer_ids: list[int]):
    """(student, transfer report, processor) holding only teacher blocks ``layer_ids`` (plus what
    comes before and after the blocks: embeddings, final norm, head), converted from the teacher's
    weights of those blocks alone: memory follows the blocks held, not the model. Its block for
    teacher block i (``student.block(i)``) equals the whole student's block i, tensor for tensor."""
    teacher_config = AutoConfig.from_pretrained(resolve_teacher_path(config.conversion_source))
    family_for_config(teacher_config)  # an unsupported architecture is named before any weight loads
    blocks = BlockSubset.of(teacher_config, layer_ids)
    torch.manual_seed(config.train.seed)
    init_model, processor = load_task_model(config, config.conversion_source, blocks=blocks)
    student, report = convert(init_model, config.plan, processor, blocks=blocks)
    return student, report, processor
