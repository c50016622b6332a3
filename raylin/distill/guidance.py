"""CALD guidance modes: which teacher guides the student at each step, and with which weights.

| mode       | teacher at step s                                   | student starts from | weights                     |
|------------|-----------------------------------------------------|---------------------|-----------------------------|
| unguided   | none                                                | pretrained (source) | task only                   |
| target     | the fine-tuned teacher, fixed                       | fine-tuned (target) | task + layer + KD           |
| trajectory | a teacher fine-tuning alongside (own optimizer/LR), | pretrained (source) | task + layer + KD           |
|            | one optimizer step every T_u student steps          |                     |                             |
| waypoint   | the first saved snapshot whose step is after s,     | pretrained (source) | task + layer + KD           |
|            | then the last snapshot                              |                     |                             |
| hybrid     | the fine-tuned teacher until the cut-off step       | fine-tuned (target) | task + layer + KD, then task|

``GuidanceSchedule.at(step)`` answers for one step; training code asks it every step and never
branches on the mode itself.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from raylin.distill.losses import LossWeights

MODES = ("unguided", "target", "trajectory", "waypoint", "hybrid")
TARGET_INITIALISED = ("target", "hybrid")


@dataclass(frozen=True)
class Waypoint:
    step: int  # student step by which this snapshot is the guide (the teacher run's step, scaled)
    path: str  # a teacher checkpoint folder


@dataclass(frozen=True)
class StepGuidance:
    """What one training step needs to know about guidance."""

    teacher: str | None  # "target", "trajectory", a waypoint path, or None (no teacher this step)
    weights: LossWeights
    update_teacher: bool = False  # trajectory: take a teacher optimizer step after this student step


@dataclass
class GuidanceSchedule:
    mode: str
    weights: LossWeights
    teacher_update_every: int = 1  # T_u, trajectory only
    waypoints: list[Waypoint] = field(default_factory=list)
    hybrid_cutoff: int | None = None  # first step without distillation, hybrid only

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"Unknown guidance.mode {self.mode!r}; choose one of {MODES}.")
        if self.teacher_update_every < 1:
            raise ValueError(f"guidance.teacher_update_every must be >= 1, got {self.teacher_update_every}.")
        if self.mode == "waypoint":
            if not self.waypoints:
                raise ValueError("guidance.mode 'waypoint' needs guidance.waypoints: a list of {step, path} snapshots.")
            steps = [w.step for w in self.waypoints]
            if steps != sorted(steps) or len(set(steps)) != len(steps):
                raise ValueError(f"guidance.waypoints must have strictly increasing steps, got {steps}.")
        if self.mode == "hybrid" and (self.hybrid_cutoff is None or self.hybrid_cutoff < 0):
            raise ValueError("guidance.mode 'hybrid' needs guidance.hybrid_cutoff: the step where distillation stops.")

    @property
    def student_starts_from_target(self) -> bool:
        return self.mode in TARGET_INITIALISED

    @property
    def uses_teacher(self) -> bool:
        return self.mode != "unguided"

    def at(self, step: int) -> StepGuidance:
        task_only = LossWeights(task=self.weights.task)
        if self.mode == "unguided" or (self.mode == "hybrid" and step >= self.hybrid_cutoff):
            return StepGuidance(None, task_only)
        if self.mode in ("target", "hybrid"):
            return StepGuidance("target", self.weights)
        if self.mode == "trajectory":
            return StepGuidance("trajectory", self.weights, update_teacher=(step + 1) % self.teacher_update_every == 0)
        steps = [w.step for w in self.waypoints]
        index = min(bisect.bisect_right(steps, step), len(steps) - 1)  # first snapshot after s, else the last
        return StepGuidance(self.waypoints[index].path, self.weights)
