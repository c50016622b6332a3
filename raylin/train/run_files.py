"""What a run writes into its output folder, and when.

| name                  | written by                | what                                              |
|-----------------------|---------------------------|---------------------------------------------------|
| ``train_log.jsonl``   | training rank 0           | one JSON record per step, each step once (a resumed run first sets aside what the lost attempt logged past its checkpoint) |
| ``train_log.discarded.jsonl`` | training rank 0   | the records set aside: steps a lost attempt ran past the checkpoint the run resumed from |
| ``student/``          | ``raylin convert``        | the final student (copied from the last checkpoint) |
| ``teacher/``          | ``raylin finetune``       | the fine-tuned teacher (a target teacher)         |
| ``snapshots/step_N/`` | ``raylin finetune``       | plain checkpoints every ``checkpoint_every`` steps (waypoints) |

The step predicates say when the loop evaluates, checkpoints and reports; Ray Tune's schedulers
see exactly the reported steps.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from raylin.config import TrainConfig
from raylin.progress import append_record

TRAIN_LOG = "train_log.jsonl"
DISCARDED_LOG = "train_log.discarded.jsonl"
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


def set_aside_unconfirmed(output_dir: str | Path, resumed_step: int) -> int:
    """Before a run resumes from the checkpoint of ``resumed_step`` (0: from the start), move the
    records of later steps (what a lost attempt logged past its last checkpoint: a killed driver, a
    restarted worker group) from the train log to ``train_log.discarded.jsonl``, so that the log holds
    each step once. Returns how many records were set aside. Rank 0 only.

    The log is cut in place (``truncate``), not replaced: a driver that follows it (raylin.progress)
    sees it shrink and reads on from the new end."""
    path = Path(output_dir) / TRAIN_LOG
    if not path.is_file():
        return 0
    kept_bytes, dropped = 0, []
    with open(path, "rb") as file:
        for line in file:
            if not line.endswith(b"\n"):  # a record cut short by a crash mid-write
                dropped.append(line + b"\n")
            elif dropped or json.loads(line)["step"] > resumed_step:
                dropped.append(line)
            else:
                kept_bytes += len(line)
    if dropped:
        with open(Path(output_dir) / DISCARDED_LOG, "ab") as aside:
            aside.writelines(dropped)
        os.truncate(path, kept_bytes)
    return len(dropped)


def read_train_log(output_dir: str | Path) -> list[dict]:
    """A run's train log, one record per step in step order; empty when the run has not logged.
    Unlike Ray Tune's per-trial results, this survives a sweep's interruption whole. (Logs written
    before raylin set aside a lost attempt's records may hold a step twice: the last record wins.)"""
    log = Path(output_dir) / TRAIN_LOG
    by_step = {}
    if log.is_file():
        for line in log.read_text().splitlines():
            record = json.loads(line)
            by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]
