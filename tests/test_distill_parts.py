"""CALD losses, guidance schedules and LIT freezing, against their definitions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_teacher

from raylin.distill.freezing import LossImprovementThreshold
from raylin.distill.guidance import GuidanceSchedule, Waypoint
from raylin.distill.losses import (
    LossWeights,
    causal_lm_loss,
    classification_loss,
    combine,
    ctc_loss,
    kd_loss,
    layerwise_loss,
)


def test_causal_lm_loss_equals_transformers_own_loss():
    model = make_teacher("llama")
    ids = torch.randint(5, 100, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(causal_lm_loss(out.logits, ids, mask), out.loss)


def test_classification_loss_equals_transformers_own_loss():
    model = make_teacher("bert")
    ids, labels = torch.randint(5, 100, (3, 7)), torch.tensor([0, 2, 1])
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(classification_loss(out.logits, labels), out.loss)


def test_ctc_loss_is_transformers_summed_ctc_per_label_token():
    model = make_teacher("wav2vec2")
    model.config.ctc_loss_reduction = "sum"
    audio = torch.randn(2, 800)
    mask = torch.ones(2, 800, dtype=torch.long)
    mask[1, 600:] = 0
    labels = torch.tensor([[3, 4, 5, 6], [7, 8, -100, -100]])
    with torch.no_grad():
        out = model(input_values=audio * mask, attention_mask=mask, labels=labels)
    frames = model._get_feat_extract_output_lengths(mask.sum(-1))
    torch.testing.assert_close(ctc_loss(out.logits, labels, frames), out.loss / 6)


def test_kd_loss_is_temperature_scaled_kl_teacher_to_student():
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 10), torch.randn(4, 10)
    T = 2.0
    p_teacher = (teacher / T).softmax(-1)
    expected = (p_teacher * (p_teacher.log() - (student / T).log_softmax(-1))).sum(-1).mean() * T**2
    torch.testing.assert_close(kd_loss(student, teacher, T), expected)
    assert kd_loss(teacher, teacher, T).abs() < 1e-6
    with pytest.raises(ValueError, match="temperature must be > 0"):
        kd_loss(student, teacher, 0.0)


def test_kd_loss_ignores_padded_positions():
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    changed = student.clone()
    changed[0, 3:] = 100.0
    assert kd_loss(student, teacher, 1.0, mask) == kd_loss(changed, teacher, 1.0, mask)


def test_layerwise_loss_options():
    torch.manual_seed(0)
    student = [torch.randn(2, 4, 8) for _ in range(3)]
    teacher = [torch.randn(2, 4, 8) for _ in range(3)]
    per_layer = [F.mse_loss(s, t) for s, t in zip(student, teacher)]
    torch.testing.assert_close(layerwise_loss(student, teacher, reduction="sum"), sum(per_layer))
    torch.testing.assert_close(layerwise_loss(student, teacher, layers=[1, 2]), (per_layer[1] + per_layer[2]) / 2)
    assert layerwise_loss(teacher, teacher) == 0
    # Parameter-free layer norm: the teacher's per-token scale and shift no longer matter.
    scaled = [3 * t + 1 for t in teacher]
    torch.testing.assert_close(
        layerwise_loss(student, scaled, normalization="layernorm"), layerwise_loss(student, teacher, normalization="layernorm"),
        rtol=1e-4, atol=1e-5,
    )
    # Padding is masked: padded positions do not count, real ones are averaged.
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    changed = [s.clone() for s in student]
    for s in changed:
        s[0, 2:] = 50.0
    assert layerwise_loss(student, teacher, mask=mask) == layerwise_loss(changed, teacher, mask=mask)
    expected = sum(((s - t).pow(2).mean(-1) * mask).sum() / mask.sum() for s, t in zip(student, teacher)) / 3
    torch.testing.assert_close(layerwise_loss(student, teacher, mask=mask), expected)
    with pytest.raises(ValueError, match="normalization 'rms'"):
        layerwise_loss(student, teacher, normalization="rms")


def test_layerwise_loss_does_not_backpropagate_into_the_teacher():
    student = [torch.randn(1, 3, 4, requires_grad=True)]
    teacher = [torch.randn(1, 3, 4, requires_grad=True)]
    layerwise_loss(student, teacher).backward()
    assert student[0].grad is not None and teacher[0].grad is None


def test_loss_weights_and_combination():
    with pytest.raises(ValueError, match="alpha_layer must be >= 0"):
        LossWeights(layer=-1.0)
    with pytest.raises(ValueError, match="alpha_out must be >= 0"):
        LossWeights(out=float("nan"))
    parts = combine(LossWeights(1.0, 2.0, 0.5), torch.tensor(1.0), torch.tensor(3.0), torch.tensor(4.0))
    assert parts["loss"] == 1 + 6 + 2 and set(parts) == {"loss", "task", "layer", "kd"}
    assert set(combine(LossWeights(), torch.tensor(1.0), None, None)) == {"loss", "task"}


WEIGHTS = LossWeights(task=1.0, layer=15.0, out=1.0)


def test_unguided_and_target_modes():
    unguided = GuidanceSchedule("unguided", WEIGHTS)
    assert unguided.at(0).teacher is None and unguided.at(0).weights == LossWeights(task=1.0)
    assert not unguided.student_starts_from_target and not unguided.uses_teacher
    target = GuidanceSchedule("target", WEIGHTS)
    assert all(target.at(s).teacher == "target" and target.at(s).weights == WEIGHTS for s in (0, 10, 10**6))
    assert target.student_starts_from_target


def test_trajectory_teacher_steps_every_t_u_student_steps():
    schedule = GuidanceSchedule("trajectory", WEIGHTS, teacher_update_every=3)
    updates = [s for s in range(12) if schedule.at(s).update_teacher]
    assert updates == [2, 5, 8, 11]
    assert all(schedule.at(s).teacher == "trajectory" for s in range(12))
    assert not schedule.student_starts_from_target


def test_waypoint_teacher_is_the_first_snapshot_after_the_step_then_the_last():
    waypoints = [Waypoint(10, "wp10"), Waypoint(20, "wp20"), Waypoint(30, "wp30")]
    schedule = GuidanceSchedule("waypoint", WEIGHTS, waypoints=waypoints)
    assert [schedule.at(s).teacher for s in (0, 9, 10, 19, 20, 29, 30, 1000)] == [
        "wp10", "wp10", "wp20", "wp20", "wp30", "wp30", "wp30", "wp30"]


def test_hybrid_distils_until_the_cutoff_then_task_only():
    schedule = GuidanceSchedule("hybrid", WEIGHTS, hybrid_cutoff=5)
    assert [schedule.at(s).teacher for s in range(4, 7)] == ["target", None, None]
    assert schedule.at(4).weights == WEIGHTS and schedule.at(5).weights == LossWeights(task=1.0)
    assert schedule.student_starts_from_target


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(mode="distil"), "guidance.mode 'distil' is unknown"),
        (dict(mode="waypoint"), "needs guidance.waypoints"),
        (dict(mode="waypoint", waypoints=[Waypoint(5, "a"), Waypoint(5, "b")]), "strictly increasing"),
        (dict(mode="hybrid"), "needs guidance.hybrid_cutoff"),
        (dict(mode="trajectory", teacher_update_every=0), "teacher_update_every must be >= 1"),
    ],
)
def test_guidance_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GuidanceSchedule(weights=WEIGHTS, **kwargs)


def test_lit_unfreezes_at_the_expected_window():
    lit = LossImprovementThreshold(window=4, threshold=0.01, patience=2, warmup_steps=2)
    # Window means: 10, 8 (20% better), 7.96 (0.5%: strike 1), 7.9 (0.75%: strike 2 -> unfreeze).
    losses = [10] * 4 + [8] * 4 + [7.96] * 4 + [7.9] * 4 + [7.0] * 4
    unfrozen = [step for step, loss in enumerate(losses) if lit.update(step, loss)]
    assert unfrozen == [15] and lit.unfrozen_at == 16 and not lit.frozen
    assert [lit.lr_multiplier(s) for s in (0, 15, 16, 17, 18, 30)] == [0.0, 0.0, 0.5, 1.0, 1.0, 1.0]


def test_lit_state_round_trips():
    lit = LossImprovementThreshold(window=2, threshold=0.1, patience=1)
    for step, loss in enumerate([5.0, 5.0, 4.9]):
        lit.update(step, loss)
    restored = LossImprovementThreshold(window=2, threshold=0.1, patience=1)
    restored.load_state_dict(lit.state_dict())
    assert restored == lit
    assert restored.update(3, 4.9) == lit.update(3, 4.9) is True
    assert math.isclose(restored.previous_mean, 4.9)
