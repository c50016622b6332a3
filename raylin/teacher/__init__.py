"""Teachers for distillation, behind one small interface the training loop calls every step:

    teachers.submit(TeacherRequest)      start work for a step (served: returns at once)
    teachers.result(step) -> TeacherOutput
    teachers.state_dict() / load_state_dict(state)   the trajectory teacher, for checkpoints

``InProcessTeachers`` (raylin.teacher.inprocess) keeps them in the worker; ``ServedTeachers``
(raylin.teacher.pool) asks Ray-actor replicas. Both run the same ``TeacherBank`` code, so the loop
never knows which one, nor which guidance mode, is active. ``teacher_service.mode`` picks.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from raylin.task_model import model_options
from raylin.fault_injection import requested_fault
from raylin.fingerprint import fingerprint
from raylin.teacher.bank import TeacherOutput, TeacherRequest, TeacherSpec, teacher_loader
from raylin.teacher.activation_cache import teacher_fingerprint
from raylin.teacher.inprocess import InProcessTeachers
from raylin.teacher.pool import ServedTeachers, TeacherPool

__all__ = ["TeacherOutput", "TeacherRequest", "TeacherSpec", "teacher_spec", "teacher_pool", "open_teachers"]


def teacher_spec(config) -> TeacherSpec:
    """The TeacherSpec of a run's distillation: the teachers its guidance mode uses, the states its losses read."""
    loss, service, guide = config.loss, config.teacher_service, config.schedule.kind.guide
    tokenizer_source = config.conversion_source
    # A cached entry is one training example's teacher outputs: keyed by everything that decides
    # which example an index is (the data section, data.source included, and the tokenizer).
    identity = {"data": dataclasses.asdict(config.data), "tokenizer": teacher_fingerprint(tokenizer_source)}
    identity["data"].pop("max_eval_examples")  # held-out examples are never cached
    if config.broad.enabled:  # training indices past the task's examples are broad examples or augmented copies
        identity["broad"] = dataclasses.asdict(config.broad)
    data_key = fingerprint(identity)
    options = model_options(config, config.target_teacher or config.teacher)
    return TeacherSpec(
        model_class=options.pop("model_class"),
        num_labels=options.pop("num_labels", config.task.num_labels),
        load_options=tuple(sorted(options.items())),
        task=config.task_kind,
        target=config.target_teacher if guide == "target" else None,
        source=config.teacher if guide == "trajectory" else None,
        trajectory_lr=config.guidance.teacher_lr,
        trajectory_every=config.guidance.teacher_update_every,
        hidden=loss.alpha_layer > 0,
        layers=None if loss.layers is None else tuple(loss.layers),
        logits=loss.alpha_out > 0,
        dtype=service.dtype,
        weights_dtype=service.weights_dtype,
        cache_dir=str(Path(service.cache_dir).expanduser()) if service.cache else None,
        cache_max_bytes=int(service.cache_max_gb * 2**30),
        data_key=data_key,
        fault=requested_fault(),
        fault_dir=config.output_dir,
    )


def teacher_pool(config, spec: TeacherSpec | None = None):
    """The TeacherPool serving ``config``'s teachers (replicas start when first asked for)."""
    service = config.teacher_service
    return TeacherPool(spec or teacher_spec(config), cpus=service.cpus, gpus=service.gpus, owner=config.run_name)


def open_teachers(config, device: torch.device, rank: int, world: int, pool=None):
    """The teachers a training worker talks to: served by ``pool`` when given, else in-process."""
    if pool is not None:
        return ServedTeachers(pool, device, rank, world)

    spec = teacher_spec(config)
    return InProcessTeachers(spec, teacher_loader(spec), device)
