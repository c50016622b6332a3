"""CALD losses: task losses, output distillation and layerwise hidden-state alignment.

    L = alpha_task * L_task + alpha_layer * L_layer + alpha_out * L_KD

Task losses: sequence / utterance classification (cross-entropy), next-token prediction (causal
LM cross-entropy) and CTC. Output KD is KL(teacher || student) on softmax at temperature T,
multiplied by T^2 so its gradient scale does not depend on T. The layerwise loss is the MSE
between student and teacher hidden states at the same depth, optionally after a parameter-free
layer norm, with padding masked out, summed or averaged over the chosen layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from raylin.tasks import TaskKind

if TYPE_CHECKING:  # for hints only: raylin.config imports this module
    from raylin.config import LossConfig

NORMALIZATIONS = ("none", "layernorm")
REDUCTIONS = ("sum", "mean")


def loss_setting_problems(temperature: float | None = None, normalization: str | None = None,
                          reduction: str | None = None) -> list[str]:
    """The rules on the loss settings, in one place: the config checks them all before a run, the
    loss functions the ones they are given. Each problem names the ``loss.`` key and the fix."""
    problems = []
    if temperature is not None and not temperature > 0:  # also rejects NaN
        problems.append(f"loss.temperature must be > 0, got {temperature}.")
    if normalization is not None and normalization not in NORMALIZATIONS:
        problems.append(f"loss.normalization {normalization!r} is unknown; choose one of {NORMALIZATIONS}.")
    if reduction is not None and reduction not in REDUCTIONS:
        problems.append(f"loss.reduction {reduction!r} is unknown; choose one of {REDUCTIONS}.")
    return problems


def _require(problems: list[str]) -> None:
    if problems:
        raise ValueError(" ".join(problems))


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of (batch, classes) logits: sequence and utterance classification."""
    return F.cross_entropy(logits.float(), labels)


def causal_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts token t+1; padded targets are ignored."""
    targets = input_ids[:, 1:].clone()
    if attention_mask is not None:
        targets[attention_mask[:, 1:] == 0] = -100
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


def ctc_loss(
    logits: torch.Tensor, labels: torch.Tensor, frame_lengths: torch.Tensor, blank: int = 0
) -> torch.Tensor:
    """CTC over (batch, frames, vocab) logits; ``labels`` are padded with -100 (as transformers does).

    Returns the loss summed over the batch divided by the total number of target tokens.
    """
    label_mask = labels >= 0
    label_lengths = label_mask.sum(-1)
    targets = labels.masked_select(label_mask)
    log_probs = logits.float().log_softmax(-1).transpose(0, 1)
    total = F.ctc_loss(log_probs, targets, frame_lengths, label_lengths, blank=blank, reduction="sum", zero_infinity=True)
    return total / label_lengths.sum().clamp(min=1)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(teacher || student) at ``temperature``, times temperature^2, averaged over positions.

    Logits are (..., vocab); ``mask`` (same leading shape, 1 = real) drops padded positions.
    """
    _require(loss_setting_problems(temperature=temperature))
    student = student_logits.float().flatten(0, -2) / temperature
    teacher = teacher_logits.float().flatten(0, -2) / temperature
    if mask is not None:
        keep = mask.flatten().bool()
        student, teacher = student[keep], teacher[keep]
    per_position = F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    return per_position.mean() * temperature**2


def layerwise_loss(
    student_hidden: Sequence[torch.Tensor],
    teacher_hidden: Sequence[torch.Tensor],
    layers: Sequence[int] | None = None,
    normalization: str = "none",
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """MSE between student and teacher hidden states at the same depth.

    ``*_hidden`` are sequences of (batch, tokens, width) tensors (transformers' ``hidden_states``:
    index 0 is the embedding output, i the output of block i); ``layers`` picks indices (default
    all). ``normalization="layernorm"`` applies a parameter-free layer norm to both sides first.
    Per layer, the squared error is averaged over features and over real positions (``mask``:
    (batch, tokens), 1 = real); layers are then summed or averaged.
    """
    _require(loss_setting_problems(normalization=normalization, reduction=reduction))
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"Student has {len(student_hidden)} hidden states, teacher {len(teacher_hidden)}.")
    indices = list(range(len(student_hidden))) if layers is None else list(layers)
    weights = None if mask is None else mask.to(torch.float32).unsqueeze(-1)
    per_layer = []
    for index in indices:
        student, teacher = student_hidden[index].float(), teacher_hidden[index].float().detach()
        if normalization == "layernorm":
            student = F.layer_norm(student, student.shape[-1:])
            teacher = F.layer_norm(teacher, teacher.shape[-1:])
        squared = (student - teacher).pow(2)
        if weights is None:
            per_layer.append(squared.mean())
        else:
            per_layer.append((squared * weights).sum() / (weights.sum() * squared.shape[-1]).clamp(min=1))
    stacked = torch.stack(per_layer)
    return stacked.sum() if reduction == "sum" else stacked.mean()


@dataclass(frozen=True)
class LossWeights:
    task: float = 1.0
    layer: float = 0.0
    out: float = 0.0

    def __post_init__(self) -> None:
        for name in ("task", "layer", "out"):
            value = getattr(self, name)
            if not value >= 0:  # also rejects NaN
                raise ValueError(f"loss.alpha_{name} must be >= 0, got {value}.")


def combine(weights: LossWeights, task: torch.Tensor, layer: torch.Tensor | None, out: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The weighted total and its parts; parts whose weight is zero are skipped (and may be None)."""
    total = weights.task * task
    parts = {"task": task.detach()}
    if weights.layer > 0:
        total = total + weights.layer * layer
        parts["layer"] = layer.detach()
    if weights.out > 0:
        total = total + weights.out * out
        parts["kd"] = out.detach()
    return {"loss": total, **parts}


def cald_losses(task: TaskKind, loss: LossConfig, weights: LossWeights, student_out, teacher_out,
                batch: dict[str, torch.Tensor], mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """One batch's CALD loss and its parts (``combine``): the task loss, the layerwise loss when
    ``weights.layer > 0`` and the output KD when ``weights.out > 0`` (``teacher_out`` may be None
    when both are off). ``student_out`` / ``teacher_out``: model outputs with ``logits`` and, for
    the layer loss, ``hidden_states``; ``mask``: the real positions (``state_mask``)."""
    task_part = task_loss(task, student_out.logits, batch.get("labels"), batch, mask)
    layer = kd = None
    if weights.layer > 0:
        layer = layerwise_loss(student_out.hidden_states, teacher_out.hidden_states, loss.layers,
                               loss.normalization, mask, loss.reduction)
    if weights.out > 0:
        per_position = student_out.logits.dim() == 3
        kd = kd_loss(student_out.logits, teacher_out.logits, loss.temperature, mask if per_position else None)
    return combine(weights, task_part, layer, kd)


def task_loss(task: TaskKind, logits: torch.Tensor, labels: torch.Tensor | None, inputs: dict[str, torch.Tensor],
              state_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The task loss of a task of this kind from a model's logits and its batch.
    ``state_mask`` (ctc): the real frames of the logits; without it every frame counts."""
    if task.classifies:
        return classification_loss(logits, labels)
    if task.language_model:
        return causal_lm_loss(logits, inputs["input_ids"], inputs.get("attention_mask"))
    frames = (state_mask.sum(-1) if state_mask is not None
              else torch.full((logits.shape[0],), logits.shape[1], dtype=torch.long, device=logits.device))
    return ctc_loss(logits, labels, frames)
