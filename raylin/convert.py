"""XATL conversion: build a student from a teacher and a plan, and transfer every shared weight.

``convert(teacher, plan)`` builds the student (the teacher's architecture with mixers in place of
attention), then copies every tensor whose name and shape the two share: embeddings, norms, FFNs,
output projections, heads, and the Q/K/V/O a Linformer mixer keeps. New mixer weights start fresh
(seeded by ``plan.seed``) or, with ``plan.init == "attention"``, from the teacher's attention where
shapes allow (Q->C, K->B, V->x, O->out_proj, as in MambaInLlama). The report lists every copied,
seeded, new and skipped tensor with parameter counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from raylin.models.families import BlockSubset, FamilyAdapter, family_for
from raylin.models.mixers import BidirectionalMixer
from raylin.models.plan import Plan
from raylin.models.student import RaylinStudent, RaylinStudentConfig
from raylin.models.teachers import load_teacher

STUDENT_PREFIX = "model."


@dataclass
class TensorRecord:
    name: str  # student tensor name (teacher name for skipped tensors)
    status: str  # copied | seeded | new | skipped
    shape: tuple[int, ...]
    numel: int
    note: str = ""


@dataclass
class TransferReport:
    """What the conversion did with every tensor of the teacher and the student."""

    teacher_class: str
    family: str
    plan: dict[str, Any]
    records: list[TensorRecord] = field(default_factory=list)

    def names(self, status: str) -> list[str]:
        return [record.name for record in self.records if record.status == status]

    def count(self, status: str) -> int:
        return sum(record.numel for record in self.records if record.status == status)

    def summary(self) -> dict[str, int]:
        return {
            status: self.count(status) for status in ("copied", "seeded", "new", "skipped")
        } | {f"{status}_tensors": len(self.names(status)) for status in ("copied", "seeded", "new", "skipped")}

    def to_dict(self) -> dict[str, Any]:
        return {
            "teacher_class": self.teacher_class,
            "family": self.family,
            "plan": self.plan,
            "summary": self.summary(),
            "tensors": [record.__dict__ | {"shape": list(record.shape)} for record in self.records],
        }

    def to_markdown(self, max_rows: int = 40) -> str:
        summary = self.summary()
        lines = [
            f"# Conversion of {self.teacher_class} ({self.family}) -> {self.plan['mixer']}",
            "",
            f"keep_attention: {self.plan['keep_attention'] or 'none'}; init: {self.plan['init']}",
            "",
            "| tensors | count | parameters |",
            "|---|---:|---:|",
        ]
        for status in ("copied", "seeded", "new", "skipped"):
            lines.append(f"| {status} | {summary[status + '_tensors']} | {summary[status]:,} |")
        lines += ["", "| tensor | status | shape | note |", "|---|---|---|---|"]
        interesting = [r for r in self.records if r.status != "copied"] + [r for r in self.records if r.status == "copied"]
        for record in interesting[:max_rows]:
            lines.append(f"| {record.name} | {record.status} | {list(record.shape)} | {record.note} |")
        if len(interesting) > max_rows:
            lines.append(f"| … {len(interesting) - max_rows} more | | | |")
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        s = self.summary()
        return (
            f"{self.teacher_class} -> {self.plan['mixer']}: copied {s['copied']:,} params ({s['copied_tensors']} tensors), "
            f"seeded {s['seeded']:,}, new {s['new']:,} ({s['new_tensors']} tensors), skipped {s['skipped']:,} "
            f"({s['skipped_tensors']} teacher tensors)"
        )


def convert(
    teacher: PreTrainedModel | str | Path,
    plan: Plan | dict[str, Any],
    processor: Any | None = None,
    blocks: BlockSubset | None = None,
) -> tuple[RaylinStudent, TransferReport]:
    """Convert ``teacher`` (a transformers model, a local folder or a Hub id) following ``plan``.

    Returns the student, in eval mode, and the transfer report. The processor (tokenizer or
    feature extractor) is attached to the student so ``save_pretrained`` writes it too; when the
    teacher is given by path it is loaded from there. ``blocks``: the teacher holds only these
    blocks (loaded with ``load_teacher(..., blocks=...)``), and so does the student; each block
    converts exactly as in the whole student.
    """
    if isinstance(teacher, (str, Path)):
        teacher, loaded_processor = load_teacher(teacher, blocks=blocks)
        processor = processor if processor is not None else loaded_processor
    family = family_for(teacher)
    plan = Plan.from_mapping(plan)
    teacher_config = teacher.config.to_dict() | (blocks.whole() if blocks else {})
    plan.check_against(family, type(teacher.config).from_dict(teacher_config))
    config = RaylinStudentConfig(
        teacher_config=teacher_config, teacher_class=type(teacher).__name__, plan=plan.to_dict(),
        layer_ids=list(blocks.layer_ids) if blocks else None,
    )
    student = RaylinStudent(config)
    report = TransferReport(type(teacher).__name__, family.name, plan.to_dict())
    seeded = _init_from_attention(teacher, student, family) if plan.init == "attention" else {}
    _transfer_shared(teacher, student, report, seeded)
    student.processor = processor
    return student.eval(), report


@torch.no_grad()
def _transfer_shared(
    teacher: PreTrainedModel, student: RaylinStudent, report: TransferReport, seeded: dict[str, str]
) -> None:
    """Copy every tensor whose name and shape teacher and student share; record all tensors."""
    teacher_state = teacher.state_dict()
    used: set[str] = set()
    seen_storage: set[int] = set()
    for name, tensor in student.state_dict().items():
        source = name.removeprefix(STUDENT_PREFIX)
        numel = 0 if tensor.data_ptr() in seen_storage else tensor.numel()  # tied weights count once
        seen_storage.add(tensor.data_ptr())
        shape = tuple(tensor.shape)
        if name in seeded:
            report.records.append(TensorRecord(name, "seeded", shape, numel, seeded[name]))
        elif source in teacher_state and teacher_state[source].shape == tensor.shape:
            tensor.copy_(teacher_state[source])
            used.add(source)
            report.records.append(TensorRecord(name, "copied", shape, numel))
        else:
            note = "shape differs from teacher" if source in teacher_state else "new mixer weight"
            report.records.append(TensorRecord(name, "new", shape, numel, note))
    for source, tensor in teacher_state.items():
        if source not in used:
            report.records.append(
                TensorRecord(source, "skipped", tuple(tensor.shape), tensor.numel(), "attention weight the student drops")
            )


def _expand_kv_heads(weight: torch.Tensor, kv_heads: int, heads: int) -> torch.Tensor:
    """Repeat grouped-query K/V rows so there is one block per query head."""
    if kv_heads == heads:
        return weight
    head_dim = weight.shape[0] // kv_heads
    return weight.view(kv_heads, head_dim, -1).repeat_interleave(heads // kv_heads, 0).reshape(heads * head_dim, -1)


@torch.no_grad()
def _init_from_attention(teacher: PreTrainedModel, student: RaylinStudent, family: FamilyAdapter) -> dict[str, str]:
    """Seed every mixer from its block's teacher attention where shapes allow.

    Each mixer knows where Q, K, V and O go (``seed_from_attention``): Mamba2 V -> x, K -> B,
    Q -> C; Mamba V -> x; Gated DeltaNet Q, K, V per head; O -> ``out_proj`` for all three; a
    Linformer keeps the teacher's projections by name already. Grouped K/V heads are repeated
    to one per query head first. Returns {student tensor name: which teacher weights seeded it}.
    """
    config = teacher.config
    heads, kv_heads = family.num_heads(config), family.num_kv_heads(config)
    teacher_layers = family.layers(teacher)  # in the student's order: block j is teacher block student.layer_ids[j]
    layer_prefix = {id(module): name for name, module in student.named_modules()}
    seeded: dict[str, str] = {}
    for layer_idx in student.mixer_layers():
        teacher_block = teacher_layers[student.layer_ids.index(layer_idx)]
        weights = family.attention_weights(family.attention(teacher_block), config)
        source = {"q": weights["q"], "k": _expand_kv_heads(weights["k"], kv_heads, heads),
                  "v": _expand_kv_heads(weights["v"], kv_heads, heads), "o": weights.get("o")}
        mixer = family.attention(student.block(layer_idx))
        mixers = [mixer.forward_mixer, mixer.backward_mixer] if isinstance(mixer, BidirectionalMixer) else [mixer]
        for sub in mixers:
            prefix = layer_prefix[id(sub)]
            for name, note in sub.seed_from_attention(source):
                seeded[f"{prefix}.{name}"] = f"layer {layer_idx} attention: {note}"
    return seeded


def freezable_copied_parameters(student: nn.Module, report: TransferReport) -> list[nn.Parameter]:
    """The student parameters XATL copied from the teacher (the ones it may freeze)."""
    copied = set(report.names("copied"))
    return [param for name, param in student.named_parameters() if name in copied]
