"""Retention: how much of the teacher's score a student keeps, per evaluation set.

``retention = student / teacher`` for scores where higher is better (accuracy) and
``teacher / student`` where lower is better (perplexity, WER, CER), so 1.0 means the student
matches its teacher and 0.5 that it kept half; a student better than its teacher scores above 1.
An error rate of 0 on both sides gives 1.0. The held-out split is named ``held_out``; every
``eval_sets`` entry (raylin.data.eval_sets) by its own name.
"""

from __future__ import annotations

import math

from raylin.data.tasks import metric_mode
from raylin.tasks import task_kind

HELD_OUT = "held_out"


def retention(metric: str, teacher: float, student: float) -> float:
    """Student / teacher (higher-is-better metrics) or teacher / student (lower-is-better)."""
    if metric_mode(metric) == "max":
        return student / teacher if teacher else math.nan
    if student == 0:
        return 1.0 if teacher == 0 else math.inf
    return teacher / student


def retention_table(task: str, teacher: dict[str, float], student: dict[str, float]) -> dict[str, dict]:
    """``{set: {metric, teacher, student, retention}}`` for the task's metric on every set both were
    scored on: the held-out split (``metric``) and each evaluation set (``NAME_metric``)."""
    metric = task_kind(task).metrics[0]
    table = {}
    for key, student_value in student.items():
        if key != metric and not key.endswith(f"_{metric}"):
            continue
        if key not in teacher:
            continue
        name = HELD_OUT if key == metric else key.removesuffix(f"_{metric}")
        table[name] = {"metric": metric, "teacher": teacher[key], "student": student_value,
                       "retention": retention(metric, teacher[key], student_value)}
    return table


def table_markdown(table: dict[str, dict]) -> str:
    """The retention table as Markdown rows (a header and one row per set)."""
    lines = ["| evaluation set | metric | teacher | student | retention |", "|---|---|---:|---:|---:|"]
    for name, row in table.items():
        lines.append(f"| {name} | {row['metric']} | {row['teacher']:.4f} | {row['student']:.4f} | {row['retention']:.3f} |")
    return "\n".join(lines)
