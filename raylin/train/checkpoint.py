"""Checkpoints of a distillation run: save, restore, and the check that a resume is the same run.

A checkpoint is one folder per worker, registered by Ray Train only once every worker's part is
stored (a crash mid-write leaves the previous checkpoint as the latest). It holds the DeepSpeed
engine (student, optimizer, scheduler: ZeRO shards included), each worker's trajectory-teacher
state, ``trainer_state.json`` (step, tokens, wall time, LIT state, config fingerprint) and, in the
final one, the student in transformers format.

DeepSpeed is imported inside the functions that use it: they run in training workers only, and
importing DeepSpeed costs seconds and probes accelerators in any process that does.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import ray.train
import torch

from raylin.atomic import replace_folder
from raylin.config import RunConfig
from raylin.faults import die
from raylin.fingerprint import fingerprint
from raylin.train.collective import barrier
from raylin.train.run_files import STUDENT_DIR

STATE_FILE = "trainer_state.json"
STAGING_DIR = ".checkpoint-staging"
# Fields that may change between a run and its resumption; everything else must match.
RESUMABLE_CHANGES = ("max_steps", "max_failures", "checkpoint_every", "eval_every")


def config_fingerprint(config: RunConfig) -> str:
    """What a checkpoint may be resumed under: the whole config but the RESUMABLE_CHANGES."""
    data = config.to_dict()
    for key in RESUMABLE_CHANGES:
        data["train"].pop(key, None)
    return fingerprint(data)


@dataclass
class TrainerState:
    step: int = 0  # steps done
    tokens: int = 0
    wall_s: float = 0.0  # training time before this attempt
    lit: dict | None = None
    config_fingerprint: str = ""


def restore(engine, teachers, lit, config: RunConfig, rank: int) -> TrainerState:
    """The state of Ray Train's latest checkpoint, loaded into ``engine``, ``teachers`` and ``lit``;
    a fresh TrainerState when the run starts from scratch. Refuses a checkpoint of another config."""
    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return TrainerState(config_fingerprint=config_fingerprint(config))
    with checkpoint.as_directory() as folder:
        state = TrainerState(**json.loads((Path(folder) / STATE_FILE).read_text()))
        if state.config_fingerprint != config_fingerprint(config):
            raise ValueError(
                f"{config.output_dir} holds run {config.run_name!r} with a different config; it would resume "
                "someone else's training state. Use a new output_dir (or set `name`), or restore the old config."
            )
        engine.load_checkpoint(folder, tag="engine")
        if lit is not None:
            lit.load_state_dict(state.lit)
        teacher_state = Path(folder) / f"teacher_rank{rank}.pt"
        if teacher_state.exists():
            teachers.load_state_dict(torch.load(teacher_state, weights_only=False))
    barrier()  # a served trajectory teacher is restored (by rank 0) before anyone asks it
    return state


@contextmanager
def staged_checkpoint(engine, teachers, state: TrainerState, rank: int, final: bool, output_dir: Path,
                      crash: bool = False) -> Iterator[ray.train.Checkpoint]:
    """This worker's part of a checkpoint, written and handed out to be reported (Ray Train copies
    it into storage at ``ray.train.report``), then removed. ``final`` adds the transformers-format
    student. ``crash`` (fault injection) ends the process half-way.

    Each rank stages in one fixed folder of the run (OUTPUT_DIR/.checkpoint-staging/rank<R>), emptied
    before every save: a worker killed mid-write leaves at most that folder, not a temp dir per crash."""
    import deepspeed

    folder = output_dir / STAGING_DIR / f"rank{rank}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        engine.save_checkpoint(str(folder), tag="engine")
        if crash:
            die()  # dies half-way through writing a checkpoint
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
            (folder / STATE_FILE).write_text(json.dumps(asdict(state)))
        yield ray.train.Checkpoint.from_directory(str(folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def save_plain_model(engine, processor, folder: Path, rank: int) -> None:
    """Write the wrapped transformers model as an ordinary checkpoint (teacher fine-tuning's
    snapshots and final teacher), replacing ``folder`` atomically."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        if rank == 0:
            def write(staging: Path) -> None:
                engine.module.model.save_pretrained(staging)
                processor.save_pretrained(staging)

            replace_folder(folder, write)
