"""The per-worker CALD training loop: Ray Train calls ``train_loop_per_worker`` on every worker.

Read one batch top to bottom in ``distill_step``: student forward (hidden states when the layer
loss is on) -> the teacher's outputs for the batch (served by Ray actors or computed in-process;
the request went out with the batch, a step early with prefetch) -> task + layerwise + KD losses
(``cald_losses``) -> the loss parts averaged over workers in one all-reduce -> a NaN check ->
DeepSpeed backward and optimizer step. Around it, ``train_loop_per_worker`` builds the run
(raylin.train.setup), restores a checkpoint (raylin.train.checkpoint), feeds batches
(raylin.train.batch), logs, evaluates (raylin.train.evaluation) and checkpoints by the step
predicates of raylin.train.run_files.

The student lives in a DeepSpeed engine (ZeRO 0-3, optional offload); teachers never do. Random
state is derived from (seed, step, rank) and the data order from the step, so a run resumed from a
checkpoint follows the same trajectory as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import ray.train
import ray.train.torch
import torch

from raylin.config import RunConfig, config_from_dict
from raylin.distill.losses import cald_losses
from raylin.fault_injection import FaultPlan
from raylin.log import setup_logging
from raylin.models.families import state_mask
from raylin.teacher import open_teachers
from raylin.tracking import sync_tracker, tracked_run
from raylin.train.batch import Batch, BatchFeed, count_tokens, model_inputs
from raylin.train.checkpoint import restore, save_plain_model, staged_checkpoint
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
from raylin.train.setup import build_optimizer, build_run

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
    parts = cald_losses(config.task.type, config.loss, weights, out, teacher_out, batch.tensors, mask)
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
    import deepspeed  # in the worker only: see raylin.train.checkpoint

    setup_logging()
    config = config_from_dict(loop_config["config"])
    finetune = loop_config.get("finetune", False)  # teacher fine-tuning: write plain snapshots
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    started = time.perf_counter()
    faults = FaultPlan.from_env(config.output_dir, rank, world)  # fault injection (raylin.fault_injection)

    # Setup: the student, its optimizer in a DeepSpeed engine, the teachers and the batches.
    ds_config = deepspeed_config(config.train, world, device)
    run = build_run(config, device, ds_config)
    teachers = open_teachers(config, device, rank, world, pool=loop_config.get("teacher_pool"))
    feed = BatchFeed(config, run.data, run.schedule, teachers, device, rank, world)
    optimizer, scheduler, lit = build_optimizer(run.student, run.report, config)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=run.student, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
    )
    resumed = restore(engine, teachers, lit, config, rank)
    tokens_seen = resumed.tokens
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:  # the train log holds each step once: what a lost attempt ran past the checkpoint goes aside
        if resumed.step:
            log.info("resumed from step %d", resumed.step)
        set_aside_unconfirmed(output_dir, resumed.step)

    engine.train()
    with tracked_run(config, output_dir) if rank == 0 else nullcontext() as tracker:  # tracking: (raylin.tracking)
        if tracker is not None:  # steps committed before a crash that the tracked run missed
            sync_tracker(tracker, output_dir, read_train_log(output_dir), resumed.step)
        for step in range(resumed.step, config.train.max_steps):
            faults.before_step(step, engine.module)
            torch.manual_seed(config.train.seed * 1_000_003 + step * world + rank)  # dropout, resumable
            batch = feed.get(step)
            means, step_tokens = distill_step(engine, batch, feed, config)
            tokens_seen += step_tokens
            if lit is not None and lit.update(step, means["loss"]) and rank == 0:
                log.info("LIT: copied weights unfreeze at step %d", lit.unfrozen_at)

            # Record, evaluate, report, checkpoint.
            done = step + 1 == config.train.max_steps
            wall_s = resumed.wall_s + time.perf_counter() - started
            metrics = {"step": step + 1, "loss": means["loss"], "lr": scheduler.get_last_lr()[0], "tokens": tokens_seen,
                       "wall_s": round(wall_s, 2), "teacher_wait_s": round(feed.teacher_wait_s, 4),
                       **{f"loss_{k}": v for k, v in means.items() if k != "loss"}}
            if lit is not None:
                metrics["copied_frozen"] = int(lit.frozen)
            evaluate_now, checkpoint_now = evaluates_at(step + 1, config.train), checkpoints_at(step + 1, config.train)
            if evaluate_now:  # the evaluation sets beyond the held-out split at the end only: they can be large
                scores = evaluate(engine.module, run.data, config, device, rank, world, sets=None if done else [""])
                metrics |= {f"eval_{k}": v for k, v in scores.items()}
            if rank == 0:
                append_train_log(output_dir, metrics)
                if (step + 1) % PROGRESS_EVERY == 0 or done:  # the driver shows progress (raylin.progress)
                    log.debug("%s", ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
            if checkpoint_now and finetune:
                save_plain_model(engine, run.processor, output_dir / SNAPSHOT_DIR / f"step_{step + 1}", rank)
                if done:
                    save_plain_model(engine, run.processor, output_dir / FINETUNED_DIR, rank)
            staged = nullcontext()
            if checkpoint_now:
                state = replace(resumed, step=step + 1, tokens=tokens_seen, wall_s=wall_s,
                                lit=lit.state_dict() if lit else None)
                staged = staged_checkpoint(engine, teachers, state, rank, done, output_dir, faults.in_checkpoint)
            if evaluate_now or checkpoint_now:
                # The step's one report: evaluation results reach Ray Tune's schedulers, and a checkpoint
                # is registered once every worker has reported its part.
                with staged as checkpoint:
                    ray.train.report(metrics, checkpoint=checkpoint)
            if checkpoint_now and tracker is not None:  # committed: its steps go to the tracked run, once
                sync_tracker(tracker, output_dir, read_train_log(output_dir), step + 1)
    write_memory_report(engine, config, output_dir, rank)
