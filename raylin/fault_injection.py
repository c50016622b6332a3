"""Fault injection, for the tests and the fault benchmarks: one switch, one object that fires.

``RAYLIN_TEST_FAULT=KIND:STEP`` makes the named fault happen once per output folder (a marker file
``.fault-KIND-STEP`` there remembers it, so a restarted worker does not fail again):

| KIND                  | who                       | what happens                                   | where (``FaultPlan``) |
|-----------------------|---------------------------|------------------------------------------------|-----------------------|
| crash                 | training rank 1 (or 0)    | its process ends before step STEP              | ``before_step``       |
| stall                 | training rank 0           | it waits STALL_S before step STEP (the others wait at its all-reduce): a window in which a test removes a node | ``before_step`` |
| nan                   | training rank 0           | the loss of step STEP is NaN (the student's logits of that step are) | ``before_step`` |
| crash-in-checkpoint   | training rank 0           | its process ends while writing STEP's checkpoint (engine state written, the rest not) | ``in_checkpoint`` |
| teacher-crash         | the teacher holder        | its process ends on its first request for STEP | ``before_teacher_request`` |

A training worker builds one ``FaultPlan`` (``from_env``) and the loop calls it at those points;
a teacher holder builds one from its TeacherSpec. Unset, every check is one string comparison;
nothing else in the training path knows about faults.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

FAULT_ENV = "RAYLIN_TEST_FAULT"
STALL_S = 120.0  # well under the collectives' 600 s timeout


def requested_fault() -> str | None:
    """The fault this process was started with (``KIND:STEP``), or None."""
    return os.environ.get(FAULT_ENV) or None


def fires(spec: str | None, kind: str, step: int, marker_dir: str | Path | None) -> bool:
    """Whether fault ``kind`` at ``step`` fires now: ``spec`` names it and it has not fired for
    ``marker_dir`` before (firing leaves the marker)."""
    if spec != f"{kind}:{step}" or not marker_dir:
        return False
    marker = Path(marker_dir) / f".fault-{kind}-{step}"
    if marker.exists():
        return False
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return True


def die() -> None:
    """End this process at once, without cleanup, as a lost node or a killed worker does."""
    os._exit(1)


@dataclass(frozen=True)
class FaultPlan:
    """The fault ``spec`` (``KIND:STEP`` or None) of one process, with its markers in ``marker_dir``
    and, in a training worker, its ``rank`` of ``world``: each method fires the faults of one point."""

    spec: str | None = None
    marker_dir: str | Path | None = None
    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls, marker_dir: str | Path, rank: int = 0, world: int = 1) -> FaultPlan:
        return cls(requested_fault(), marker_dir, rank, world)

    def before_step(self, step: int, student: torch.nn.Module) -> None:
        """Before step ``step`` takes its batch: crash, stall, or arm ``student`` to make the step's loss NaN."""
        if self.rank == min(1, self.world - 1) and fires(self.spec, "crash", step, self.marker_dir):
            die()  # a worker dies without cleanup, as on a lost node
        if self.rank == 0 and fires(self.spec, "stall", step, self.marker_dir):
            time.sleep(STALL_S)  # the run holds still while a test takes a node away
        if self.rank == 0 and fires(self.spec, "nan", step, self.marker_dir):
            _NanLogitsOnce(student)

    def in_checkpoint(self, step: int) -> None:
        """Half-way through writing checkpoint ``step``: the engine's state written, the rest not."""
        if self.rank == 0 and fires(self.spec, "crash-in-checkpoint", step, self.marker_dir):
            die()

    def before_teacher_request(self, step: int) -> None:
        """A teacher holder's first request for step ``step``."""
        if fires(self.spec, "teacher-crash", step, self.marker_dir):
            die()  # the holder's process dies mid-request, as on a lost node


class _NanLogitsOnce:
    """A forward hook on ``student`` that makes its next forward's logits NaN (and so every loss read
    from them), then removes itself."""

    def __init__(self, student: torch.nn.Module):
        self.handle = student.register_forward_hook(self)

    def __call__(self, module: torch.nn.Module, args: tuple, output):
        self.handle.remove()
        output["logits"] = output["logits"] * float("nan")
        return output
