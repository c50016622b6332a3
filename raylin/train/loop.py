"""The per-worker CALD training loop (Ray Train calls ``train_loop_per_worker`` on every worker).

One step, read top to bottom: take this worker's share of global batch ``step`` (its teacher
request was sent a step earlier) -> send the request for step+1 (prefetch) -> ask the guidance
schedule which weights apply -> student forward (hidden states when the layer loss is on) ->
teacher outputs (raylin.teacher: served by Ray actors or in-process, same interface) -> task +
layerwise + KD losses -> DeepSpeed backward and step -> LIT bookkeeping -> report, and every
``checkpoint_every`` steps an atomic checkpoint through Ray Train.

The student lives in a DeepSpeed engine (ZeRO 0-3, optional offload); teachers never do. Random
state is derived from (seed, step, rank), and the data order from the step, so a run resumed
from a checkpoint follows the same trajectory as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from raylin.config import RunConfig, TrainConfig, config_from_dict
from raylin.convert import convert, freezable_copied_parameters
from raylin.data.tasks import TaskData, finish_scores, load_task_data, load_task_model, score_sums, score_width
from raylin.data.text import GlobalBatches
from raylin.distill.freezing import LossImprovementThreshold
from raylin.distill.losses import combine, kd_loss, layerwise_loss, task_loss
from raylin.models.families import state_mask
from raylin.teacher import TeacherRequest, open_teachers
from raylin.train.deepspeed import deepspeed_config
from raylin.train.optim import adamw

STATE_FILE = "trainer_state.json"
SNAPSHOT_DIR = "snapshots"  # teacher fine-tuning: plain checkpoints every checkpoint_every steps (waypoints)
FINETUNED_DIR = "teacher"  # teacher fine-tuning: the final plain checkpoint (a target teacher)
TRAIN_LOG = "train_log.jsonl"  # one JSON line per step (rank 0); after a resume, the last line of a step wins
STUDENT_DIR = "student"
# Fields that may change between a run and its resumption; everything else must match.
RESUMABLE_CHANGES = ("max_steps", "max_failures", "checkpoint_every", "eval_every")
# Fault injection for tests: "crash:STEP" ends rank 1's process before STEP, "nan:STEP" makes the
# loss NaN at STEP, "crash-in-checkpoint:STEP" ends rank 0 while writing the checkpoint of STEP.
# Each fires once per output folder (a marker file remembers it).
FAULT_ENV = "RAYLIN_TEST_FAULT"


def evaluates_at(step: int, train: TrainConfig) -> bool:
    """Whether the loop evaluates after ``step`` (1-based): every ``eval_every`` steps and the last."""
    return step == train.max_steps or bool(train.eval_every) and step % train.eval_every == 0


def checkpoints_at(step: int, train: TrainConfig) -> bool:
    """Whether the loop checkpoints after ``step`` (1-based): every ``checkpoint_every`` steps and the last."""
    return step == train.max_steps or step % train.checkpoint_every == 0


def reports_at(step: int, train: TrainConfig) -> bool:
    """Whether ``step``'s metrics reach Ray Train (and so Ray Tune's schedulers): evaluations and checkpoints."""
    return evaluates_at(step, train) or checkpoints_at(step, train)


def read_train_log(output_dir: str | Path) -> list[dict]:
    """A run's train log, one record per step in step order; empty when the run has not logged.

    A resumed run re-runs the steps after its checkpoint and appends them: the last record of a
    step wins. Unlike Ray Tune's per-trial results, this survives a sweep's interruption whole."""
    log = Path(output_dir) / TRAIN_LOG
    by_step = {}
    if log.is_file():
        for line in log.read_text().splitlines():
            record = json.loads(line)
            by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]


def config_fingerprint(config: RunConfig) -> str:
    import hashlib

    data = config.to_dict()
    for key in RESUMABLE_CHANGES:
        data["train"].pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _fault(config: RunConfig, kind: str, step: int, rank: int, rank_wanted: int) -> bool:
    spec = os.environ.get(FAULT_ENV, "")
    if spec != f"{kind}:{step}" or rank != rank_wanted:
        return False
    marker = Path(config.output_dir) / f".fault-{kind}-{step}"
    if marker.exists():
        return False
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return True


def _step_totals(parts: dict[str, torch.Tensor], num_tokens: torch.Tensor) -> tuple[dict[str, float], int]:
    """Loss parts averaged over workers and the global token count, in one all-reduce."""
    names = list(parts)
    values = torch.stack([parts[k].detach().float() for k in names] + [num_tokens.float()])
    values = _sum_across_workers(values)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return {k: (values[i] / world).item() for i, k in enumerate(names)}, int(values[-1].item())


def _sum_across_workers(value: torch.Tensor) -> torch.Tensor:
    value = value.detach().clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value)
    return value


def linear_warmup_decay(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / max(warmup, 1)
    return max(0.0, (total - step) / max(total - warmup, 1))


def converted_student(config: RunConfig):
    """The XATL-converted student (and transfer report, tokenizer or feature extractor) a run starts
    from: converted from the target teacher for target/hybrid guidance, else from the pretrained
    model. Deterministic."""
    torch.manual_seed(config.train.seed)  # a new task head and new mixers start the same on every rank
    init_model, processor = load_task_model(config, init_teacher(config))
    student, report = convert(init_model, config.plan, processor)
    return student, report, processor


def init_teacher(config: RunConfig) -> str:
    return config.target_teacher if config.guidance_schedule().student_starts_from_target else config.teacher


def build_run(config: RunConfig, device: torch.device):
    """Student (converted, then aligned when the align stage ran), data and task pieces for one
    worker. Same on every rank."""
    student, report, processor = converted_student(config)
    if config.align.enabled:
        from raylin.train.align import load_aligned

        load_aligned(student, config)
    data = load_task_data(config, processor)
    return config.guidance_schedule(), student.to(device), report, processor, data


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


def count_tokens(batch: dict[str, torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
    """Real positions of a batch: tokens, Wav2Vec2 frames (``mask`` is its state mask), or mel frames
    for Whisper, whose inputs carry no mask."""
    if mask is not None:
        return mask.sum()
    inputs = next(iter(model_inputs(batch).values()))
    return torch.tensor(inputs.shape[0] * inputs.shape[-1], device=inputs.device)


@torch.no_grad()
def evaluate(model, data: TaskData, config: RunConfig, device, rank: int, world: int,
             sets: list[str] | None = None) -> dict[str, float]:
    """The task metric on the held-out sets ``sets`` (default all: the main one, "", and every
    evaluation set), each worker scoring its shard. The main set's scores are ``{metric: value}``,
    an extra set's ``{f"{name}_{metric}": value}``."""
    model.eval()
    # No activations are kept for a backward pass, so a worker scores 4x its training batch at once
    # (fewer, larger forwards: what costs most on a CPU is the number of calls).
    batch_size = max(4 * config.train.batch_size // world, 8)
    scores: dict[str, float] = {}
    for name, size in data.eval_sets.items():
        if sets is not None and name not in sets:
            continue
        sums = torch.zeros(score_width(config.task.type), dtype=torch.float64, device=device)
        shard = list(range(rank, size, world))
        for start in range(0, len(shard), batch_size):
            batch = {k: v.to(device) for k, v in data.eval_batch(name, shard[start : start + batch_size]).items()}
            logits = model(**model_inputs(batch)).logits
            sums += score_sums(config.task.type, logits, batch, state_mask(model, batch)).double()
        prefix = f"{name}_" if name else ""
        scores |= {prefix + k: v for k, v in finish_scores(config.task.type, _sum_across_workers(sums)).items()}
    model.train()
    return scores


def train_loop_per_worker(loop_config: dict) -> None:
    import deepspeed
    import ray.train
    import ray.train.torch

    config = config_from_dict(loop_config["config"])
    finetune = loop_config.get("finetune", False)  # teacher fine-tuning: write plain snapshots
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    started = time.perf_counter()

    schedule, student, report, processor, data = build_run(config, device)
    teachers = open_teachers(config, device, rank, world, pool=loop_config.get("teacher_pool"))
    batches = GlobalBatches(data.num_train, config.train.batch_size, config.data.seed)

    def batch_for(step: int) -> tuple[list[int], dict[str, torch.Tensor]]:
        idx = batches.shard(step, rank, world)
        return idx, {k: v.to(device) for k, v in data.train_batch(idx).items()}

    def ask_teacher(step: int, idx: list[int], batch: dict[str, torch.Tensor]) -> None:
        guidance = schedule.at(step)
        if guidance.teacher is not None:
            labels = batch["labels"].cpu().numpy() if "labels" in batch else None
            teachers.submit(TeacherRequest(
                step, guidance.teacher, {k: v.cpu().numpy() for k, v in model_inputs(batch).items()},
                labels=labels, example_ids=idx, update_teacher=guidance.update_teacher))

    # Two parameter groups: copied (XATL-frozen until LIT unfreezes them) and the rest.
    copied = freezable_copied_parameters(student, report)
    copied_ids = {id(p) for p in copied}
    others = [p for p in student.parameters() if id(p) not in copied_ids]
    lit = None
    if config.freeze.copied:
        lit = LossImprovementThreshold(**vars(config.freeze.lit))
        for param in copied:  # zero gradients while frozen, so Adam's moments stay fresh
            param.register_hook(lambda grad: grad if not lit.frozen else torch.zeros_like(grad))
    main = lambda step: linear_warmup_decay(step, config.train.warmup_steps, config.train.max_steps)
    copied_lambda = (lambda step: main(step) * lit.lr_multiplier(step)) if lit else main
    # Empty groups are left out (DeepSpeed drops them): e.g. teacher fine-tuning copies everything.
    groups, lambdas = [], []
    for params, schedule_fn in ((others, main), (copied, copied_lambda)):
        if params:
            groups.append({"params": params})
            lambdas.append(schedule_fn)
    optimizer = adamw(groups, lr=config.train.lr, weight_decay=config.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=student, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(config.train, world, device),
    )

    start_step, tokens_seen, wall_before = 0, 0, 0.0
    fingerprint = config_fingerprint(config)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = json.loads((Path(folder) / STATE_FILE).read_text())
            if state["config_fingerprint"] != fingerprint:
                raise ValueError(
                    f"{config.output_dir} holds run {config.run_name!r} with a different config; it would resume "
                    "someone else's training state. Use a new output_dir (or set `name`), or restore the old config."
                )
            engine.load_checkpoint(folder, tag="engine")
            start_step, tokens_seen, wall_before = state["step"], state["tokens"], state["wall_s"]
            if lit is not None:
                lit.load_state_dict(state["lit"])
            teacher_state = Path(folder) / f"teacher_rank{rank}.pt"
            if teacher_state.exists():
                teachers.load_state_dict(torch.load(teacher_state, weights_only=False))
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # a served trajectory teacher is restored (by rank 0) before anyone asks it
        if rank == 0:
            print(f"[raylin] resumed from step {start_step}", flush=True)

    engine.train()
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    loss_cfg = config.loss
    prefetch, prefetched = config.teacher_service.prefetch, None
    for step in range(start_step, config.train.max_steps):
        if _fault(config, "crash", step, rank, rank_wanted=min(1, world - 1)):
            os._exit(1)  # a worker dies without cleanup, as on a lost node
        torch.manual_seed(config.train.seed * 1_000_003 + step * world + rank)  # dropout, resumable
        if prefetched is None:
            idx, batch = batch_for(step)
            ask_teacher(step, idx, batch)
        else:
            idx, batch = prefetched
        # Prefetch: the teacher works on step s+1 while the student computes step s. Not across a
        # checkpoint, so a saved trajectory teacher has seen exactly the steps before it.
        prefetched = None
        if prefetch and not checkpoints_at(step + 1, config.train):
            prefetched = batch_for(step + 1)
            ask_teacher(step + 1, *prefetched)
        guidance = schedule.at(step)
        inputs = model_inputs(batch)
        out = engine(**inputs, output_hidden_states=guidance.weights.layer > 0)
        teacher_out = teachers.result(step) if guidance.teacher is not None else None
        # Real positions of the hidden states and per-position logits: tokens, Wav2Vec2 frames, or
        # None (Whisper's mel frames all count).
        mask = state_mask(engine, batch)
        task = task_loss(config.task.type, out.logits, batch.get("labels"), batch, mask)
        layer = kd = None
        if guidance.weights.layer > 0:
            layer = layerwise_loss(out.hidden_states, teacher_out.hidden_states, loss_cfg.layers,
                                   loss_cfg.normalization, mask, loss_cfg.reduction)
        if guidance.weights.out > 0:
            kd = kd_loss(out.logits, teacher_out.logits, loss_cfg.temperature, mask if out.logits.dim() == 3 else None)
        parts = combine(guidance.weights, task, layer, kd)
        if _fault(config, "nan", step, rank, rank_wanted=0):
            parts["loss"] = parts["loss"] * float("nan")
        means, step_tokens = _step_totals(parts, count_tokens(batch, mask))
        global_loss = means["loss"]
        if not math.isfinite(global_loss):
            raise FloatingPointError(
                f"Loss is {global_loss} at step {step} (parts: { {k: float(v) for k, v in parts.items()} }). "
                f"Training stopped; the last good checkpoint is kept under {config.output_dir}. Lower train.lr, "
                "raise loss.temperature, or check the data."
            )
        engine.backward(parts["loss"])
        engine.step()
        tokens_seen += step_tokens
        if lit is not None and lit.update(step, global_loss) and rank == 0:
            print(f"[raylin] LIT: copied weights unfreeze at step {lit.unfrozen_at}", flush=True)

        done = step + 1 == config.train.max_steps
        metrics = {"step": step + 1, "loss": global_loss, "lr": scheduler.get_last_lr()[0], "tokens": tokens_seen,
                   "wall_s": round(wall_before + time.perf_counter() - started, 2),
                   **{f"loss_{k}": v for k, v in means.items() if k != "loss"}}
        if lit is not None:
            metrics["copied_frozen"] = int(lit.frozen)
        evaluate_now, checkpoint_now = evaluates_at(step + 1, config.train), checkpoints_at(step + 1, config.train)
        if evaluate_now:  # the evaluation sets beyond the held-out split at the end only: they can be large
            scores = evaluate(engine.module, data, config, device, rank, world, sets=None if done else [""])
            metrics |= {f"eval_{k}": v for k, v in scores.items()}
        if rank == 0:
            with open(Path(config.output_dir) / TRAIN_LOG, "a") as log:
                log.write(json.dumps(metrics) + "\n")
        if rank == 0 and ((step + 1) % 10 == 0 or done):
            shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
            print(f"[raylin] {shown}", flush=True)
        if evaluate_now and not checkpoint_now:
            ray.train.report(metrics)  # evaluation results reach Ray Tune's schedulers between checkpoints
        if checkpoint_now:
            state = {"step": step + 1, "tokens": tokens_seen, "lit": lit.state_dict() if lit else None,
                     "wall_s": wall_before + time.perf_counter() - started, "config_fingerprint": fingerprint}
            crash = _fault(config, "crash-in-checkpoint", step + 1, rank, rank_wanted=0)
            if finetune:
                name = f"{SNAPSHOT_DIR}/step_{step + 1}"
                _save_plain_model(engine, processor, Path(config.output_dir) / name, rank)
                if done:
                    _save_plain_model(engine, processor, Path(config.output_dir) / FINETUNED_DIR, rank)
            _save_checkpoint(engine, teachers, state, metrics, rank, done, Path(config.output_dir), crash)


def _save_plain_model(engine, processor, folder: Path, rank: int) -> None:
    """Write the wrapped transformers model as an ordinary checkpoint (teacher fine-tuning)."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        if rank == 0:
            staging = folder.with_name(f".{folder.name}.incoming")
            shutil.rmtree(staging, ignore_errors=True)
            engine.module.model.save_pretrained(staging)
            processor.save_pretrained(staging)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(staging, folder)


def _save_checkpoint(engine, teachers, state, metrics, rank, final, output_dir: Path, crash=False) -> None:
    """Write this worker's part of a checkpoint and report it; Ray Train registers it only once
    every part is stored, so a crash mid-write leaves the previous checkpoint as the latest.

    Each rank stages in one fixed folder of the run (OUTPUT_DIR/.checkpoint-staging/rank<R>), emptied
    before every save: a worker killed mid-write leaves at most that folder, not a temp dir per crash."""
    import deepspeed
    import ray.train

    folder = output_dir / ".checkpoint-staging" / f"rank{rank}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        engine.save_checkpoint(str(folder), tag="engine")
        if crash:
            os._exit(1)  # dies half-way through writing a checkpoint
        teacher_state = teachers.state_dict()
        if teacher_state:
            torch.save(teacher_state, folder / f"teacher_rank{rank}.pt")
        if final:
            # The HF-format student: ZeRO-3 shards are gathered on every rank, rank 0 writes.
            params = list(engine.module.parameters())
            with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
                if rank == 0:
                    engine.module.save_pretrained(folder / STUDENT_DIR)
        if rank == 0:
            (folder / STATE_FILE).write_text(json.dumps(state))
        ray.train.report(metrics | {"wall_s": state["wall_s"]}, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


