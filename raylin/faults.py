"""Fault injection, for the tests and the fault benchmarks: one switch, one place that fires.

``RAYLIN_TEST_FAULT=KIND:STEP`` makes the named fault happen once per output folder (a marker file
``.fault-KIND-STEP`` there remembers it, so a restarted worker does not fail again):

| KIND                  | who                       | what happens                                   |
|-----------------------|---------------------------|------------------------------------------------|
| crash                 | training rank 1 (or 0)    | its process ends before step STEP              |
| nan                   | training rank 0           | the loss of step STEP is NaN                   |
| crash-in-checkpoint   | training rank 0           | its process ends while writing STEP's checkpoint |
| teacher-crash         | the teacher holder        | its process ends on its first request for STEP |
| stall                 | training rank 0           | it waits STALL_S before step STEP (the others wait at its all-reduce): a window in which a test removes a node |

Unset, every check is one string comparison; nothing else in the training path knows about faults.
"""

from __future__ import annotations

import os
from pathlib import Path

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
