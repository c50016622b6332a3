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

import importlib
import json
import math
import shutil
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import ray.train
import torch

from raylin.atomic import replace_folder
from raylin.config import RunConfig
from raylin.fingerprint import fingerprint
from raylin.train.collective import barrier
from raylin.train.run_files import STUDENT_DIR

STATE_FILE = "trainer_state.json"
STAGING_DIR = ".checkpoint-staging"
# Fields that may change between a run and its resumption; everything else must match.
RESUMABLE_CHANGES = ("max_steps", "max_failures", "checkpoint_every", "eval_every", "keep_checkpoints")


def resume_identity(config: RunConfig) -> dict:
    """What makes a run the same run: the whole config but the RESUMABLE_CHANGES and ``tracking``
    (where metrics are sent does not change the run). A checkpoint resumes only under an equal one;
    raylin.pipeline.check_output_dir names the keys where two differ."""
    data = config.to_dict()
    data.pop("tracking", None)
    for key in RESUMABLE_CHANGES:
        data["train"].pop(key, None)
    return data


def config_fingerprint(config: RunConfig) -> str:
    """What a checkpoint may be resumed under: the fingerprint of ``resume_identity``."""
    return fingerprint(resume_identity(config))


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
            teachers.load_state_dict(torch.load(teacher_state, weights_only=True))
    barrier()  # a served trajectory teacher is restored (by rank 0) before anyone asks it
    return state


@contextmanager
def staged_checkpoint(engine, teachers, state: TrainerState, rank: int, final: bool, output_dir: Path,
                      halfway: Callable[[int], None] | None = None) -> Iterator[ray.train.Checkpoint]:
    """This worker's part of a checkpoint, written and handed out to be reported (Ray Train copies
    it into storage at ``ray.train.report``), then removed. ``final`` adds the transformers-format
    student. ``halfway(step)`` runs once the engine's state is written (fault injection:
    ``FaultPlan.in_checkpoint`` ends the process there).

    Each rank stages in one fixed folder of the run (OUTPUT_DIR/.checkpoint-staging/rank<R>), emptied
    before every save: a worker killed mid-write leaves at most that folder, not a temp dir per crash."""

    folder = output_dir / STAGING_DIR / f"rank{rank}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        engine.save_checkpoint(str(folder), tag="engine")
        if halfway is not None:
            halfway(state.step)
        teacher_state = teachers.state_dict()
        if teacher_state:
            torch.save(teacher_state, folder / f"teacher_rank{rank}.pt")
        if final:
            write_student(engine, folder / STUDENT_DIR, rank)
        if rank == 0:
            (folder / STATE_FILE).write_text(json.dumps(asdict(state)))
        yield ray.train.Checkpoint.from_directory(str(folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def save_plain_model(engine, processor, folder: Path, rank: int) -> None:
    """Write the wrapped transformers model as an ordinary checkpoint (teacher fine-tuning's
    snapshots and final teacher), replacing ``folder`` atomically."""
    state = consolidated_state(engine)
    if rank == 0:
        inner = None if state is None else {k.removeprefix("model."): v for k, v in state.items()}

        def write(staging: Path) -> None:
            engine.module.model.save_pretrained(staging, state_dict=inner)
            processor.save_pretrained(staging)

        replace_folder(folder, write)


def consolidated_state(engine) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict on rank 0 for writing it, or None to write the module's own
    (below ZeRO-3, and on the other ranks). Under ZeRO-3 the parameters are gathered one at a time
    and rank 0 keeps a copy of each, so only rank 0 ever holds the whole model, once; tied
    parameters stay one tensor. All ranks call this: under ZeRO-3 it is a collective."""
    if engine.zero_optimization_stage() != 3:
        return None
    deepspeed = importlib.import_module("deepspeed")  # in workers only: see the module doc
    rank0 = torch.distributed.get_rank() == 0
    state: dict[str, torch.Tensor] = {}
    for name, tensor in _zero3_tensors(engine.module):
        with deepspeed.zero.GatheredParameters([tensor], enabled=hasattr(tensor, "ds_id")):
            if rank0:
                state[name] = tensor.detach().clone()
    return state if rank0 else None


def _zero3_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter or buffer) for every entry of a ZeRO-3 module's state dict, a tied
    parameter under its first name only (loading restores the others)."""
    params = dict(module.named_parameters(remove_duplicate=False))
    entries, seen = [], set()
    for name, tensor in module.state_dict().items():
        param = params.get(name)
        if param is None:  # a buffer: never partitioned
            entries.append((name, tensor))
        elif param.ds_id not in seen:
            seen.add(param.ds_id)
            entries.append((name, param))
    return entries


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


def write_student(engine, folder: Path, rank: int) -> None:
    """The student's transformers folder, written by rank 0. Under ZeRO-3 its model.safetensors is
    streamed one gathered parameter at a time (the header first: every shape is known from the
    partitions), so no rank ever holds the whole model; tied parameters are stored once, as
    ``save_pretrained`` stores them. All ranks call this: under ZeRO-3 it is a collective."""
    student = engine.module
    if engine.zero_optimization_stage() != 3:
        if rank == 0:
            student.save_pretrained(folder)
        return
    deepspeed = importlib.import_module("deepspeed")  # in workers only: see the module doc
    entries = _zero3_tensors(student)

    def stream(sink) -> None:
        for _, tensor in entries:
            partitioned = hasattr(tensor, "ds_id")
            with deepspeed.zero.GatheredParameters([tensor], enabled=partitioned):
                if sink is not None:
                    sink.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())

    if rank != 0:
        stream(None)  # the gathers rank 0's writing takes part in
        return

    def write_weights(path: Path) -> None:
        header, offset = {}, 0
        for name, tensor in entries:
            shape = list(tensor.ds_shape) if hasattr(tensor, "ds_id") else list(tensor.shape)
            size = math.prod(shape) * tensor.element_size()
            header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
        header["__metadata__"] = {"format": "pt"}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
        with open(path, "wb") as sink:
            sink.write(struct.pack("<Q", len(encoded)) + encoded)
            stream(sink)

    student.save_pretrained(folder, write_weights=write_weights)
