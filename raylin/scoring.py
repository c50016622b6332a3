"""Scoring, in one place: the task metrics, which way each is better, and retention.

* Each metric's direction is declared in the task registry (``raylin.tasks.METRICS``), not guessed
  from its name; whatever compares two scores (retention, the benchmarks' gaps) asks
  ``metric(name).higher_is_better``, and a metric missing there is refused.
* ``score_sums`` / ``finish_scores``: a task's held-out metric from sums that add up over batches
  and workers, so the score is the same for any number of workers (raylin.train.evaluation runs
  them, each worker on its shard): accuracy, perplexity (and its mean token loss), or for CTC the
  word and character error rates of greedy transcripts (``error_counts``, jiwer).
* Retention: how much of the teacher's score a student keeps, per evaluation set.

``retention = student / teacher`` for scores where higher is better (accuracy) and
``teacher / student`` where lower is better (perplexity, WER, CER), so 1.0 means the student
matches its teacher and 0.5 that it kept half; a student better than its teacher scores above 1.
An error rate of 0 on both sides gives 1.0. The held-out split is named ``held_out``; every
``eval_sets`` entry (raylin.data.eval_sets) by its own name.
"""

from __future__ import annotations

import math

import torch

from raylin.data.transcripts import greedy_decode, ids_to_text
from raylin.distill.losses import causal_lm_loss
from raylin.registry import registry_entry
from raylin.tasks import METRICS, TaskKind

HELD_OUT = "held_out"


# ----- a task's held-out metric -----------------------------------------------------------------


def score_sums(kind: TaskKind, logits: torch.Tensor, batch: dict[str, torch.Tensor],
               state_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sums that add up over batches and workers: (correct, count), (summed NLL, predicted tokens), or
    for ctc (word errors, reference words, character errors, reference characters). ``state_mask``
    (ctc): the real frames of the logits (``FamilyAdapter.state_mask``)."""
    if kind.language_model:
        mask = batch.get("attention_mask")
        count = (mask[:, 1:].sum() if mask is not None else torch.tensor(batch["input_ids"][:, 1:].numel())).float()
        nll = causal_lm_loss(logits, batch["input_ids"], mask) * count
        return torch.stack([nll.detach().float(), count.to(nll.device)])
    if kind.transcribes:
        references = [ids_to_text(row[row >= 0].tolist()) for row in batch["labels"].cpu()]
        counts = error_counts(references, greedy_decode(logits, state_mask))
        return torch.tensor(counts, dtype=torch.float32, device=logits.device)
    correct = (logits.argmax(-1) == batch["labels"]).sum().float()
    return torch.stack([correct, torch.tensor(float(len(batch["labels"])), device=correct.device)])


def score_width(kind: TaskKind) -> int:
    """How many sums ``score_sums`` returns for ``task``."""
    return 4 if kind.transcribes else 2


def finish_scores(kind: TaskKind, sums: torch.Tensor) -> dict[str, float]:
    """The metric from ``score_sums`` totals."""
    if kind.transcribes:
        return {"wer": sums[0].item() / max(sums[1].item(), 1.0), "cer": sums[2].item() / max(sums[3].item(), 1.0)}
    total, count = sums[0].item(), max(sums[1].item(), 1.0)
    if kind.language_model:
        return {"perplexity": math.exp(total / count), "loss": total / count}
    return {"accuracy": total / count}


def error_counts(references: list[str], hypotheses: list[str]) -> tuple[int, int, int, int]:
    """(word errors, reference words, character errors, reference characters), summable over batches.

    Errors are substitutions + deletions + insertions (jiwer). An empty reference counts its
    hypothesis' words as insertions.
    """
    import jiwer

    word_errors = words = char_errors = chars = 0
    for reference, hypothesis in zip(references, hypotheses):
        if not reference:
            word_errors += len(hypothesis.split())
            char_errors += len(hypothesis)
            continue
        if hypothesis:
            w = jiwer.process_words(reference, hypothesis)
            c = jiwer.process_characters(reference, hypothesis)
            word_errors += w.substitutions + w.deletions + w.insertions
            char_errors += c.substitutions + c.deletions + c.insertions
        else:
            word_errors += len(reference.split())
            char_errors += len(reference)
        words += len(reference.split())
        chars += len(reference)
    return word_errors, words, char_errors, chars


# ----- retention --------------------------------------------------------------------------------


def retention(metric: str, teacher: float, student: float) -> float:
    """Student / teacher (higher-is-better metrics) or teacher / student (lower-is-better)."""
    if registry_entry(METRICS, metric, "metric").higher_is_better:
        return student / teacher if teacher else math.nan
    if student == 0:
        return 1.0 if teacher == 0 else math.inf
    return teacher / student


def retention_table(kind: TaskKind, teacher: dict[str, float], student: dict[str, float]) -> dict[str, dict]:
    """``{set: {metric, teacher, student, retention}}`` for the task's metric on every set both were
    scored on: the held-out split (``metric``) and each evaluation set (``NAME_metric``)."""
    metric = kind.metric.name
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
