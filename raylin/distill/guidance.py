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

``GUIDANCE_MODES`` states what each mode is (who guides, where the student starts); the schedule
and every caller ask those properties, never the mode's name. ``GuidanceSchedule.at(step)`` answers
for one step; training code asks it every step.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from raylin.distill.losses import LossWeights
from raylin.registry import registry_entry

@dataclass(frozen=True)
class GuidanceMode:
    """What a ``guidance.mode`` is: which teacher guides (``target``: the fine-tuned teacher, fixed;
    ``trajectory``: one fine-tuning alongside; ``waypoints``: saved snapshots; None: no teacher),
    whether the student starts from the fine-tuned teacher, and whether guidance stops at a cut-off step."""

    name: str
    guide: str | None
    starts_from_target: bool
    stops_at_cutoff: bool = False

    @property
    def fixed_teacher(self) -> bool:
        """A teacher whose outputs never change during the run (target, hybrid, waypoints)."""
        return self.guide in ("target", "waypoints")

    @property
    def trains_teacher(self) -> bool:
        return self.guide == "trajectory"


GUIDANCE_MODES: dict[str, GuidanceMode] = {mode.name: mode for mode in (
    GuidanceMode("unguided", None, starts_from_target=False),
    GuidanceMode("target", "target", starts_from_target=True),
    GuidanceMode("trajectory", "trajectory", starts_from_target=False),
    GuidanceMode("waypoint", "waypoints", starts_from_target=False),
    GuidanceMode("hybrid", "target", starts_from_target=True, stops_at_cutoff=True),
)}
MODES = tuple(GUIDANCE_MODES)


def guidance_mode(name: str) -> GuidanceMode:
    """The registry entry of ``guidance.mode`` ``name``; ValueError naming the choices for an unknown one."""
    return registry_entry(GUIDANCE_MODES, name, "guidance.mode")


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
        kind = guidance_mode(self.mode)
        if self.teacher_update_every < 1:
            raise ValueError(f"guidance.teacher_update_every must be >= 1, got {self.teacher_update_every}.")
        if kind.guide == "waypoints":
            if not self.waypoints:
                raise ValueError(f"guidance.mode {self.mode!r} needs guidance.waypoints: a list of {{step, path}} snapshots.")
            steps = [w.step for w in self.waypoints]
            if steps != sorted(steps) or len(set(steps)) != len(steps):
                raise ValueError(f"guidance.waypoints must have strictly increasing steps, got {steps}.")
        if kind.stops_at_cutoff and (self.hybrid_cutoff is None or self.hybrid_cutoff < 0):
            raise ValueError(f"guidance.mode {self.mode!r} needs guidance.hybrid_cutoff: the step where distillation stops.")

    @property
    def kind(self) -> GuidanceMode:
        return GUIDANCE_MODES[self.mode]

    @property
    def student_starts_from_target(self) -> bool:
        return self.kind.starts_from_target

    @property
    def uses_teacher(self) -> bool:
        return self.kind.guide is not None

    def at(self, step: int) -> StepGuidance:
        task_only = LossWeights(task=self.weights.task)
        guide = self.kind.guide
        if guide is None or (self.kind.stops_at_cutoff and step >= self.hybrid_cutoff):
            return StepGuidance(None, task_only)
        if guide == "target":
            return StepGuidance("target", self.weights)
        if guide == "trajectory":
            return StepGuidance("trajectory", self.weights, update_teacher=(step + 1) % self.teacher_update_every == 0)
        steps = [w.step for w in self.waypoints]
        index = min(bisect.bisect_right(steps, step), len(steps) - 1)  # first snapshot after s, else the last
        return StepGuidance(self.waypoints[index].path, self.weights)
