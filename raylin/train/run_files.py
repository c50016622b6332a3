"""What a run writes into its output folder, and when.

| name                  | written by                | what                                              |
|-----------------------|---------------------------|---------------------------------------------------|
| ``train_log.jsonl``   | training rank 0           | one JSON record per step (after a resume, the last record of a step wins) |
| ``student/``          | ``raylin convert``        | the final student (copied from the last checkpoint) |
| ``teacher/``          | ``raylin finetune``       | the fine-tuned teacher (a target teacher)         |
| ``snapshots/step_N/`` | ``raylin finetune``       | plain checkpoints every ``checkpoint_every`` steps (waypoints) |

The step predicates say when the loop evaluates, checkpoints and reports; Ray Tune's schedulers
see exactly the reported steps.
"""

from __future__ import annotations

import json
from pathlib import Path

from raylin.config import TrainConfig
from raylin.progress import append_record

TRAIN_LOG = "train_log.jsonl"
STUDENT_DIR = "student"
FINETUNED_DIR = "teacher"
SNAPSHOT_DIR = "snapshots"


def evaluates_at(step: int, train: TrainConfig) -> bool:
    """Whether the loop evaluates after ``step`` (1-based): every ``eval_every`` steps and the last."""
    return step == train.max_steps or bool(train.eval_every) and step % train.eval_every == 0


def checkpoints_at(step: int, train: TrainConfig) -> bool:
    """Whether the loop checkpoints after ``step`` (1-based): every ``checkpoint_every`` steps and the last."""
    return step == train.max_steps or step % train.checkpoint_every == 0


def reports_at(step: int, train: TrainConfig) -> bool:
    """Whether ``step``'s metrics reach Ray Train (and so Ray Tune's schedulers): evaluations and checkpoints."""
    return evaluates_at(step, train) or checkpoints_at(step, train)


def append_train_log(output_dir: str | Path, record: dict) -> None:
    """Append one step's record to the run's train log (rank 0 only calls this)."""
    append_record(Path(output_dir) / TRAIN_LOG, record)


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
