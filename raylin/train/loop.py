"""The per-worker CALD training loop: Ray Train calls ``train_loop_per_worker`` on every worker.

Read one batch top to bottom in ``distill_step``: student forward (hidden states when the layer
loss is on) -> the teacher's outputs for the batch (served by Ray actors or computed in-process;
the request went out with the batch, a step early with prefetch) -> task + layerwise + KD losses
(``cald_losses``) -> the loss parts averaged over workers in one all-reduce -> a NaN check ->
DeepSpeed backward and optimizer step. Around it, ``train_loop_per_worker`` reads as setup
(``build_worker``: raylin.train.setup, the teachers, the batch feed of raylin.train.batch, the
DeepSpeed engine) -> restore (``resume``: raylin.train.checkpoint) -> for each step: faults (one
``FaultPlan``, raylin.fault_injection: nothing else here knows about them), batch, step, log
(``step_metrics``, ``record``), evaluate (raylin.train.evaluation) and report / checkpoint
(``report_and_checkpoint``) by the step predicates of raylin.train.run_files.

The student lives in a DeepSpeed engine (ZeRO 0-3, optional offload); teachers never do. Random
state is derived from (seed, step, rank) and the data order from the step, so a run resumed from a
checkpoint follows the same trajectory as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

from raylin.config import RunConfig, config_from_dict
from raylin.distill.freezing import LossImprovementThreshold
from raylin.distill.losses import cald_losses
from raylin.fault_injection import FaultPlan
from raylin.log import setup_logging
from raylin.models.families import state_mask
from raylin.teacher import open_teachers
from raylin.tracking import Tracker, sync_tracker, tracked_run
from raylin.train.batch import Batch, BatchFeed, count_tokens, model_inputs
from raylin.train.checkpoint import TrainerState, restore, save_plain_model, staged_checkpoint
from raylin.train.collective import sum_across_workers, world_size
from raylin.train.deepspeed import deepspeed_config
from raylin.train.evaluation import evaluate
from raylin.train.memory import write_memory_report
from raylin.train.run_files import (
    FINETUNED_DIR,
    SNAPSHOT_DIR,
    append_train_log,
    checkpoints_at,
    evaluates_at,
    read_train_log,
    set_aside_unconfirmed,
)
from raylin.train.setup import RunParts, build_optimizer, build_run

log = logging.getLogger(__name__)

PROGRESS_EVERY = 10  # steps between progress lines (and the last step)


def distill_step(engine, batch: Batch, feed: BatchFeed, config: RunConfig) -> tuple[dict[str, float], int]:
    """One optimizer step on ``batch``: returns the loss parts averaged over workers and the tokens
    the step consumed across workers. Raises FloatingPointError (before the update) on a NaN or
    infinite loss."""
    weights = batch.guidance.weights
    # 1. Student forward (speech features in the dtype it computes in); hidden states only when the
    #    layer loss reads them.
    inputs = model_inputs(batch.tensors, next(engine.module.parameters()).dtype)
    out = engine(**inputs, output_hidden_states=weights.layer > 0)
    # 2. The teacher's outputs for this batch (None for a task-only step).
    teacher_out = feed.teacher_output(batch)
    # 3. The losses. Real positions of the hidden states and per-position logits: tokens, Wav2Vec2
    #    frames, or None (Whisper's mel frames all count).
    mask = state_mask(engine, batch.tensors)
    parts = cald_losses(config.task_kind, config.loss, weights, out, teacher_out, batch.tensors, mask)
    # 4. Every part averaged over workers, and the global token count, in one all-reduce.
    names = list(parts)
    totals = sum_across_workers(torch.stack([parts[k].detach().float() for k in names] +
                                            [count_tokens(batch.tensors, mask).float()]))
    means = {k: (totals[i] / world_size()).item() for i, k in enumerate(names)}
    if not math.isfinite(means["loss"]):
        raise FloatingPointError(
            f"Loss is {means['loss']} at step {batch.step} (parts: { {k: float(v) for k, v in parts.items()} }). "
            f"Training stopped; the last good checkpoint is kept under {config.output_dir}. Lower train.lr, "
            "raise loss.temperature, or check the data."
        )
    # 5. Backward and optimizer step (DeepSpeed: gradient all-reduce or ZeRO partitioning, clipping).
    engine.backward(parts["loss"])
    engine.step()
    return means, int(totals[-1].item())


def train_loop_per_worker(loop_config: dict) -> None:
    """One training worker's run (``loop_config``: the run config, and ``finetune`` / ``teacher_pool``)."""
    setup_logging()
    started = time.perf_counter()
    worker = build_worker(loop_config)
    config, rank, output_dir = worker.config, worker.rank, worker.output_dir
    faults = FaultPlan.from_env(output_dir, rank, worker.world)
    resumed = resume(worker)
    state = resumed
    worker.engine.train()
    with tracked_run(config, output_dir) if rank == 0 else nullcontext() as tracker:  # tracking: (raylin.tracking)
        if tracker is not None:  # steps committed before a crash that the tracked run missed
            sync_tracker(tracker, output_dir, read_train_log(output_dir), resumed.step)
        for step in range(resumed.step, config.train.max_steps):
            faults.before_step(step, worker.engine.module)
            torch.manual_seed(config.train.seed * 1_000_003 + step * worker.world + rank)  # dropout, resumable
            batch = worker.feed.get(step)
            means, step_tokens = distill_step(worker.engine, batch, worker.feed, config)
            if worker.lit is not None and worker.lit.update(step, means["loss"]) and rank == 0:
                log.info("LIT: copied weights unfreeze at step %d", worker.lit.unfrozen_at)
            state = replace(state, step=step + 1, tokens=state.tokens + step_tokens,
                            wall_s=resumed.wall_s + time.perf_counter() - started)
            metrics = step_metrics(worker, state, means)
            if evaluates_at(state.step, config.train):
                metrics |= evaluation_metrics(worker, state.step)
            record(worker, metrics)
            report_and_checkpoint(worker, state, metrics, faults, tracker)
    write_memory_report(worker.engine, config, output_dir, rank)


@dataclass
class Worker:
    """What one training worker builds before its first step (``build_worker``)."""

    config: RunConfig
    rank: int
    world: int
    device: torch.device
    output_dir: Path
    run: RunParts
    teachers: Any  # InProcessTeachers or ServedTeachers (raylin.teacher)
    feed: BatchFeed
    engine: Any  # the DeepSpeed engine holding the student
    scheduler: Any
    lit: LossImprovementThreshold | None
    finetune: bool  # teacher fine-tuning: write plain snapshots


def build_worker(loop_config: dict) -> Worker:
    """Setup: the student, its optimizer in a DeepSpeed engine, the teachers and the batches."""
    import deepspeed  # in the worker only: see raylin.train.checkpoint

    config = config_from_dict(loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    ds_config = deepspeed_config(config.train, world, device)
    run = build_run(config, device, ds_config)
    teachers = open_teachers(config, device, rank, world, pool=loop_config.get("teacher_pool"))
    feed = BatchFeed.for_training(config, run.data, run.schedule, teachers, device, rank, world)
    optimizer, scheduler, lit = build_optimizer(run.student, run.report, config)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=run.student, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
    )
    return Worker(config, rank, world, device, Path(config.output_dir), run, teachers, feed, engine, scheduler, lit,
                  loop_config.get("finetune", False))


def resume(worker: Worker) -> TrainerState:
    """The latest checkpoint's state, loaded into the worker (step 0 on a fresh run). The train log
    holds each step once: rank 0 sets aside what a lost attempt ran past the checkpoint."""
    state = restore(worker.engine, worker.teachers, worker.lit, worker.config, worker.rank)
    worker.output_dir.mkdir(parents=True, exist_ok=True)
    if worker.rank == 0:
        if state.step:
            log.info("resumed from step %d", state.step)
        set_aside_unconfirmed(worker.output_dir, state.step)
    return state


def step_metrics(worker: Worker, state: TrainerState, means: dict[str, float]) -> dict:
    """The train-log record of the step ``state`` ends: loss and its parts, rate, tokens, time."""
    metrics = {"step": state.step, "loss": means["loss"], "lr": worker.scheduler.get_last_lr()[0],
               "tokens": state.tokens, "wall_s": round(state.wall_s, 2),
               "teacher_wait_s": round(worker.feed.teacher_wait_s, 4),
               **{f"loss_{k}": v for k, v in means.items() if k != "loss"}}
    if worker.lit is not None:
        metrics["copied_frozen"] = int(worker.lit.frozen)
    return metrics


def evaluation_metrics(worker: Worker, step: int) -> dict[str, float]:
    """The held-out scores after ``step``, as ``eval_*`` metrics; the evaluation sets beyond the
    held-out split at the end only (they can be large)."""
    sets = None if step == worker.config.train.max_steps else [""]
    scores = evaluate(worker.engine.module, worker.run.data, worker.config, worker.device, worker.rank, worker.world,
                      sets=sets)
    return {f"eval_{k}": v for k, v in scores.items()}


def record(worker: Worker, metrics: dict) -> None:
    """Rank 0 appends the step to the train log; every PROGRESS_EVERY steps and at the end it logs it
    (the driver shows progress from the log: raylin.progress)."""
    if worker.rank != 0:
        return
    append_train_log(worker.output_dir, metrics)
    if metrics["step"] % PROGRESS_EVERY == 0 or metrics["step"] == worker.config.train.max_steps:
        log.debug("%s", ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))


def report_and_checkpoint(worker: Worker, state: TrainerState, metrics: dict, faults: FaultPlan,
                          tracker: Tracker | None) -> None:
    """After an evaluation or at a checkpoint step, the step's one report: evaluation results reach
    Ray Tune's schedulers, and a checkpoint is registered once every worker has reported its part.
    Fine-tuning also writes a plain snapshot (and at the end the fine-tuned teacher)."""
    train, step = worker.config.train, state.step
    done, checkpoint_now = step == train.max_steps, checkpoints_at(step, train)
    if checkpoint_now and worker.finetune:
        engine, processor, out = worker.engine, worker.run.processor, worker.output_dir
        save_plain_model(engine, processor, out / SNAPSHOT_DIR / f"step_{step}", worker.rank)
        if done:
            save_plain_model(engine, processor, out / FINETUNED_DIR, worker.rank)
    if not (checkpoint_now or evaluates_at(step, train)):
        return
    staged = nullcontext()
    if checkpoint_now:
        state = replace(state, lit=worker.lit.state_dict() if worker.lit else None)
        staged = staged_checkpoint(worker.engine, worker.teachers, state, worker.rank, done, worker.output_dir,
                                   faults.in_checkpoint)
    with staged as checkpoint:
        ray.train.report(metrics, checkpoint=checkpoint)
    if checkpoint_now and tracker is not None:  # committed: its steps go to the tracked run, once
        sync_tracker(tracker, worker.output_dir, read_train_log(worker.output_dir), step)
