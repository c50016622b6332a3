"""Teachers for distillation, behind one small interface the training loop calls every step:

    teachers.submit(TeacherRequest)      start work for a step (served: returns at once)
    teachers.result(step) -> TeacherOutput
    teachers.state_dict() / load_state_dict(state)   the trajectory teacher, for checkpoints

``InProcessTeachers`` (raylin.teacher.inprocess) keeps them in the worker; ``ServedTeachers``
(raylin.teacher.pool) asks Ray-actor replicas. Both run the same ``TeacherBank`` code, so the loop
never knows which one, nor which guidance mode, is active. ``teacher_service.mode`` picks.
"""

from __future__ import annotations

import torch

from raylin.teacher.bank import FAULT_ENV, TeacherOutput, TeacherRequest, TeacherSpec

__all__ = ["TeacherOutput", "TeacherRequest", "TeacherSpec", "teacher_spec", "teacher_pool", "open_teachers"]


def teacher_spec(config) -> TeacherSpec:
    """The TeacherSpec of a run's distillation: the teachers its guidance mode uses, the states its losses read."""
    import os
    from pathlib import Path

    from raylin.data.tasks import model_options
    from raylin.teacher.cache import teacher_fingerprint

    mode, loss, service = config.guidance.mode, config.loss, config.teacher_service
    schedule = config.guidance_schedule()
    tokenizer_source = config.target_teacher if schedule.student_starts_from_target else config.teacher
    d = config.data
    data_key = (f"{d.name}|{d.eval_fraction}|{d.seed}|{d.max_train_examples}|{d.max_length}|{d.held_out}|"
                f"{d.max_seconds}|{d.size}|{teacher_fingerprint(tokenizer_source)}")
    if config.broad.enabled:  # training indices past the task's examples are broad examples or augmented copies
        data_key += f"|broad:{sorted(vars(config.broad).items())}"
    options = model_options(config, config.target_teacher or config.teacher)
    return TeacherSpec(
        model_class=options.pop("model_class"),
        num_labels=options.pop("num_labels", config.task.num_labels),
        load_options=tuple(sorted(options.items())),
        task=config.task.type,
        target=config.target_teacher if mode in ("target", "hybrid") else None,
        source=config.teacher if mode == "trajectory" else None,
        trajectory_lr=config.guidance.teacher_lr,
        trajectory_every=config.guidance.teacher_update_every,
        hidden=loss.alpha_layer > 0,
        layers=None if loss.layers is None else tuple(loss.layers),
        logits=loss.alpha_out > 0,
        dtype=service.dtype,
        cache_dir=str(Path(service.cache_dir).expanduser()) if service.cache else None,
        cache_max_bytes=int(service.cache_max_gb * 2**30),
        data_key=data_key,
        fault=os.environ.get(FAULT_ENV),
        fault_dir=config.output_dir,
    )


def teacher_pool(config, spec: TeacherSpec | None = None):
    """The TeacherPool serving ``config``'s teachers (replicas start when first asked for)."""
    from raylin.teacher.pool import TeacherPool

    service = config.teacher_service
    return TeacherPool(spec or teacher_spec(config), cpus=service.cpus, gpus=service.gpus, owner=config.run_name)


def open_teachers(config, device: torch.device, rank: int, world: int, pool=None):
    """The teachers a training worker talks to: served by ``pool`` when given, else in-process."""
    if pool is not None:
        from raylin.teacher.pool import ServedTeachers

        return ServedTeachers(pool, device, rank, world)
    from raylin.teacher.bank import teacher_loader
    from raylin.teacher.inprocess import InProcessTeachers

    spec = teacher_spec(config)
    return InProcessTeachers(spec, teacher_loader(spec), device)
