"""The ``align`` stage: layer-parallel alignment of the student's blocks to the teacher's, from served
activations, before distillation.

Each student block i learns to map the teacher's input of block i to the teacher's output of block i
(masked MSE, raylin.distill.losses.layerwise_loss, after the distillation's ``loss.normalization``:
a causal LM's residual stream grows with depth, so without it a few large channels would decide).
Blocks do not depend on each other here, so they are spread round-robin over ``align.num_workers``
Ray tasks (a 24-layer model can use 24); every task reads the same teacher activations from the
TeacherPool (``states="layer_io"``: exactly what each teacher block saw and produced) through
distillation's batch feed (``BatchFeed.for_alignment``: batches in an order of their own, the next
one's request sent while these blocks train), and trains what distillation's parameter split
(raylin.optim.copied_and_new) calls new. The teacher is the model the student was converted
from (the target teacher for target/hybrid guidance, else the pretrained one). By default only the
new mixer weights learn (``align.parameters: new``); the copied weights already match the teacher.
Linformer's length projections learn at ``align.projection_lr``: they start N(0, 1), and at a
linear layer's rate a short alignment leaves them where they started. Limit: with
``linformer.share: layer`` the one student-wide projection lives outside the blocks, so it is not
aligned; it keeps its initialisation until distillation.

Writes ALIGNED/model.safetensors (the weights alignment trained: the new mixer weights, or the whole blocks with ``parameters: all``) and ALIGNED/align.json (per-layer
MSE before and after, on a held-out batch); the distill stage loads them onto the freshly converted
student (``load_aligned``). ALIGNED is OUTPUT_DIR/aligned, or ``align.dir``/FINGERPRINT when runs
share a store: the fingerprint covers everything the aligned weights depend on (the model aligned
to, plan, data, align settings, the loss normalization, seed), not the guidance mode or the other
distillation settings, so runs that differ only there (Tune trials, a benchmark's guidance modes)
align once. A finished stage is reused when its fingerprint matches.

A task holds only the blocks it aligns (``align.holds: blocks``,
raylin.train.student_build.block_local_student): they are built from those blocks' teacher
weights alone, each exactly as in the whole student (a block's new weights have a seed of their
own), so its memory follows blocks per task, not model size, and the aligned weights equal those
of a task holding the whole student (``holds: model``).

Limits: a task also holds what comes before and after the blocks (embeddings, final norm, task
head): block inputs other than the hidden states (masks, rotary embeddings) are taken from the
student's own first block call, which is what every block receives in the supported families. On a multi-node cluster ``align.dir``
(like OUTPUT_DIR) must be storage every node reads. Runs that start the same alignment at the same
time take turns through a lock file next to it (``flock``: local folders and NFS): one computes,
the others wait and reuse it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import ray
import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file

from raylin.atomic import replace_folder
from raylin.config import RunConfig, config_from_dict
from raylin.data.task_data import load_task_data, prepare_task_data
from raylin.distill.losses import layerwise_loss
from raylin.fingerprint import fingerprint
from raylin.models.families import family_for, family_for_config, state_mask
from raylin.models.mixers import LinformerProjection
from raylin.optim import adamw, copied_and_new
from raylin.progress import append_record, follow
from raylin.teacher import TeacherOutput, open_teachers, teacher_pool, teacher_spec
from raylin.train.batch import Batch, BatchFeed
from raylin.train.memory import peak_rss_mb
from raylin.train.student_build import assign_tensors, block_local_student, converted_student, held_blocks

ALIGNED_DIR = "aligned"
WEIGHTS_FILE = "model.safetensors"
SUMMARY_FILE = "align.json"
ALIGN_PROGRESS_DIR = ".align-progress"  # one JSON-lines file per align task: the driver shows the progress
HELD_OUT_STEP = -1  # the step number of the held-out batch each block is scored on


class _StopForward(Exception):
    pass


def block_call_arguments(student: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[tuple, dict]:
    """The arguments (besides the hidden states) the model passes to its blocks for ``inputs``:
    runs the model up to its first block only."""
    captured = {}

    def grab(module, args, kwargs):
        captured["args"], captured["kwargs"] = args[1:], kwargs
        raise _StopForward

    first = family_for(student.model).layers(student.model)[0]  # the first block held, in a block-local student
    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            student(**inputs)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured["args"], captured["kwargs"]


def run_block(block: torch.nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _fingerprint(config: RunConfig) -> str:
    """What the aligned weights depend on; the guidance mode only through the model aligned to."""
    align = {k: v for k, v in dataclasses.asdict(config.align).items() if k not in ("enabled", "dir", "holds")}
    data = {"align": align, "plan": config.plan, "teacher": config.teacher, "aligned_to": config.conversion_source,
            "data": dataclasses.asdict(config.data), "seed": config.train.seed, "dtype": config.teacher_service.dtype,
            "normalization": config.loss.normalization}
    if config.broad.enabled:  # left out otherwise, so alignments made before the broad stage existed stay valid
        data["broad"] = dataclasses.asdict(config.broad)
    return fingerprint(data)


def aligned_dir(config: RunConfig) -> Path:
    """Where this run's aligned blocks live: OUTPUT_DIR/aligned, or align.dir/FINGERPRINT when shared."""
    if config.align.dir:
        return Path(config.align.dir).expanduser() / _fingerprint(config)
    return Path(config.output_dir) / ALIGNED_DIR


def _finished(out: Path, fingerprint: str) -> dict | None:
    summary_file = out / SUMMARY_FILE
    if summary_file.exists() and (out / WEIGHTS_FILE).exists():
        summary = json.loads(summary_file.read_text())
        if summary.get("fingerprint") == fingerprint:
            return summary
    return None


def align_spec(config: RunConfig):
    """The TeacherSpec for alignment: every block's input and output of the model the student came from."""
    return dataclasses.replace(teacher_spec(config), target=config.conversion_source, source=None, hidden=True,
                               layers=None, logits=False, states="layer_io")


def align_layers(config_dict: dict, layer_ids: list[int], pool, progress_file: str | None = None) -> dict:
    """One alignment worker: train the student blocks ``layer_ids`` against served teacher activations;
    appends each step's loss to ``progress_file`` (raylin.progress shows it on the driver) where this
    node sees the driver's output folder (one machine, or a shared file system); elsewhere it trains
    without writing progress."""
    if progress_file and not Path(progress_file).parent.is_dir():
        progress_file = None
    config = config_from_dict(config_dict)
    align = config.align
    if align.holds == "blocks":
        student, report, processor = block_local_student(config, layer_ids)
    else:
        student, report, processor = converted_student(config)
    student.eval()  # no dropout: the target is a deterministic map
    blocks = {i: student.block(i) for i in layer_ids}
    params = trained_parameters(student, report, blocks, align.parameters)
    optimizer = align_optimizer(params, blocks, align)
    data = load_task_data(config, processor, stage="align")  # with broad.enabled: task + broad examples
    feed = BatchFeed.for_alignment(config, data, open_teachers(config, torch.device("cpu"), 0, 1, pool=pool))
    held_out = min(align.batch_size, data.eval_sets[""])
    before = held_out_losses(student, blocks, feed, held_out, config.loss.normalization)
    tokens = 0
    for step in range(align.steps):
        batch = feed.get(step)  # step+1's request goes out too: the teacher serves it while these blocks train
        if optimizer is None:
            continue
        loss = sum(block_losses(student, blocks, batch, feed.teacher_output(batch), config.loss.normalization).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress_file:
            tokens += int(batch.tensors["attention_mask"].sum()) if "attention_mask" in batch.tensors else 0
            append_record(progress_file, {"step": step + 1, "loss": loss.item(), "tokens": tokens})
    after = held_out_losses(student, blocks, feed, held_out, config.loss.normalization)
    # The weights that learned (the rest of each block is the conversion's, which the distill stage
    # rebuilds), named as in the whole student (a block-local student's block j is teacher block layer_ids[j]).
    held = held_blocks(student)
    learned = {id(p) for p in params}
    state = {held.whole_key(name)[0]: p.detach().clone() for name, p in student.named_parameters() if id(p) in learned}
    # The task runs in a process of its own (max_calls=1), so the process's peak is the task's.
    peak_mb = peak_rss_mb()
    return {"layers": {i: {"mse_before": before[i], "mse_after": after[i]} for i in layer_ids}, "state": state,
            "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "peak_rss_mb": round(peak_mb, 1)}


def trained_parameters(student: torch.nn.Module, report, blocks: dict[int, torch.nn.Module], which: str
                       ) -> list[torch.nn.Parameter]:
    """The weights alignment trains in ``blocks``, block by block: the new ones (``align.parameters:
    new``; the copied ones already match the teacher) or all of them. They alone get gradients."""
    new = {id(p) for p in copied_and_new(student, report).new}
    params = [p for block in blocks.values() for p in block.parameters() if which == "all" or id(p) in new]
    for param in student.parameters():
        param.requires_grad_(False)
    for param in params:
        param.requires_grad_(True)
    return params


def align_optimizer(params: list[torch.nn.Parameter], blocks: dict[int, torch.nn.Module], align
                    ) -> torch.optim.Optimizer | None:
    """AdamW over ``params`` at ``align.lr``, Linformer's length projections at ``align.projection_lr``;
    None when the blocks have nothing to train."""
    projections = {id(m.weight) for block in blocks.values() for m in block.modules()
                   if isinstance(m, LinformerProjection)}
    groups = [{"params": [p for p in params if id(p) not in projections], "lr": align.lr},
              {"params": [p for p in params if id(p) in projections], "lr": align.projection_lr}]
    groups = [group for group in groups if group["params"]]
    return adamw(groups, weight_decay=0.0) if groups else None


def block_losses(student: torch.nn.Module, blocks: dict[int, torch.nn.Module], batch: Batch, teacher: TeacherOutput,
                 normalization: str) -> dict[int, torch.Tensor]:
    """Each block's masked MSE between its output for the teacher's input of that block and the
    teacher's output of it (``teacher``: every block's input and output, ``states="layer_io"``)."""
    inputs, states = batch.inputs, teacher.hidden_states
    args, kwargs = block_call_arguments(student, inputs)
    losses, mask = {}, state_mask(student, inputs)
    for i, block in blocks.items():
        predicted = run_block(block, states[i].float(), args, kwargs)
        losses[i] = layerwise_loss([predicted], [states[i + 1]], normalization=normalization, mask=mask)
    return losses


def held_out_losses(student: torch.nn.Module, blocks: dict[int, torch.nn.Module], feed: BatchFeed, count: int,
                    normalization: str) -> dict[int, float]:
    """``block_losses`` on the first ``count`` held-out examples (batch -1: never a training step)."""
    batch = feed.held_out(HELD_OUT_STEP, count)
    with torch.no_grad():
        losses = block_losses(student, blocks, batch, feed.teacher_output(batch), normalization)
    return {i: v.item() for i, v in losses.items()}


def run_align(config: RunConfig) -> dict:
    """Driver side: align every block across ``align.num_workers`` Ray tasks; write ``aligned_dir``
    (or reuse what a run with the same fingerprint wrote there)."""
    out = aligned_dir(config)
    fingerprint = _fingerprint(config)
    # Runs aligning the same way at the same time (Tune trials, a sweep's modes) take turns: the
    # first computes, the others wait for it and reuse its result.
    out.parent.mkdir(parents=True, exist_ok=True)
    # One aligner per store entry, across processes and nodes (filelock: flock on local and NFS folders).
    with FileLock(out.with_name(f".{out.name}.lock")):
        finished = _finished(out, fingerprint)
        if finished:
            return finished
        return _align(config, out, fingerprint)


def _align(config: RunConfig, out: Path, fingerprint: str) -> dict:
    started = time.perf_counter()
    teacher_config = config.teacher_config()
    num_layers = family_for_config(teacher_config).num_layers(teacher_config)
    workers = min(config.align.num_workers, num_layers)
    groups = [list(range(num_layers))[w::workers] for w in range(workers)]
    prepare_task_data(config)  # token shards, before the tasks and the replica read them
    progress = Path(config.output_dir) / ALIGN_PROGRESS_DIR
    shutil.rmtree(progress, ignore_errors=True)  # an earlier attempt's
    progress.mkdir(parents=True)
    files = [progress / f"task{k}.jsonl" for k in range(workers)]
    pool = teacher_pool(config, align_spec(config))
    # SPREAD: block tasks go to different nodes where there are several, each reading its own node's replica.
    # max_calls=1: each task gets a fresh worker process, which hands its memory back when it ends.
    task = ray.remote(max_calls=1)(align_layers).options(num_cpus=config.train.cpus_per_worker, max_retries=2,
                                                         scheduling_strategy="SPREAD")
    try:
        with follow("align", config.align.steps, files):
            results = ray.get([task.remote(config.to_dict(), group, pool, str(file)) for group, file in zip(groups, files)])
        teacher_stats = pool.report()
    finally:
        pool.shutdown()
    state = {k: v for result in results for k, v in result["state"].items()}
    layers = {int(i): v for result in results for i, v in result["layers"].items()}
    summary = {"fingerprint": fingerprint, "steps": config.align.steps, "workers": workers,
               "wall_s": round(time.perf_counter() - started, 1),
               "layers": {str(i): layers[i] for i in sorted(layers)},
               "worker_pids": sorted({r["pid"] for r in results}), "holds": config.align.holds,
               "task_peak_rss_mb": [r["peak_rss_mb"] for r in results], "teacher": teacher_stats}

    def write(staging: Path) -> None:
        save_file({k: v.contiguous() for k, v in state.items()}, staging / WEIGHTS_FILE)
        (staging / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))

    replace_folder(out, write)
    return summary


def load_aligned(student: torch.nn.Module, config: RunConfig) -> None:
    """Put the aligned blocks' weights (written by ``run_align``) onto a freshly converted student."""
    file = aligned_dir(config) / WEIGHTS_FILE
    if not file.exists():
        raise FileNotFoundError(f"align.enabled is set but {file} does not exist: run the align stage first "
                                "(raylin convert runs it), or set align.enabled=false.")
    state = load_file(file)
    unknown = sorted(set(state) - set(student.state_dict()))
    if unknown:
        raise ValueError(f"{file} does not match this student (unknown weights {unknown[:3]}...); delete it to re-align.")
    assign_tensors(student, state)  # also into a student ZeRO-3 built partitioned
