"""Teachers for distillation, behind one small interface the training loop calls every step.

``outputs(guidance, batch)`` returns the teacher's hidden states and logits for a batch, for the
teacher the guidance names (the fixed target, the trajectory teacher, or a waypoint snapshot);
``after_student_step(guidance)`` lets the trajectory teacher take its optimizer step. The loop never
asks which mode is active. This module keeps the teachers in the worker's own process (tiny runs,
and the fallback of the Ray-actor teacher service, which implements the same interface).

Limits: teachers run in eval mode (no dropout), so targets are deterministic; the trajectory
teacher accumulates its gradient over the T_u batches between its steps and averages it over
workers, so every replica follows the same path on the same global batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers import PreTrainedModel

from raylin.distill.guidance import StepGuidance


@dataclass
class TeacherOutput:
    hidden_states: tuple[torch.Tensor, ...]
    logits: torch.Tensor | None


class InProcessTeachers:
    """The teachers of one run, held in this process.

    ``load`` is a callable mapping a checkpoint path to a transformers model (with the task head);
    ``target`` is the fine-tuned teacher (target / hybrid), ``source`` the pretrained model the
    trajectory teacher starts from.
    """

    def __init__(
        self,
        load,
        target: str | None = None,
        source: str | None = None,
        trajectory_lr: float = 3e-5,
        trajectory_every: int = 1,
        task_loss=None,
    ):
        self._load = load
        self._models: dict[str, PreTrainedModel] = {}
        self.target_path = target
        self.trajectory_every = trajectory_every
        self._task_loss = task_loss
        self._trajectory_optimizer = None
        if source is not None:
            model = load(source)
            model.train()
            self._models["trajectory"] = model
            self._trajectory_optimizer = torch.optim.AdamW(model.parameters(), lr=trajectory_lr)

    def model(self, name: str) -> PreTrainedModel:
        if name == "target":
            name = self.target_path
        if name not in self._models:
            # Waypoints replace each other: keep only the fixed teachers and the current snapshot.
            for key in [k for k in self._models if k not in ("trajectory", self.target_path)]:
                del self._models[key]
            self._models[name] = self._load(name).eval()
        return self._models[name]

    def outputs(self, guidance: StepGuidance, batch: dict) -> TeacherOutput | None:
        if guidance.teacher is None:
            return None
        model_inputs = {k: v for k, v in batch.items() if k != "labels"}
        if guidance.teacher == "trajectory":
            teacher = self._models["trajectory"]
            out = teacher(**model_inputs, output_hidden_states=True)
            # The targets are the teacher's states before its update; its task loss trains it.
            loss = self._task_loss(out, batch) / self.trajectory_every
            loss.backward()
            return TeacherOutput(tuple(h.detach() for h in out.hidden_states), out.logits.detach())
        with torch.no_grad():
            out = self.model(guidance.teacher)(**model_inputs, output_hidden_states=True)
        return TeacherOutput(out.hidden_states, getattr(out, "logits", None))

    def after_student_step(self, guidance: StepGuidance) -> None:
        if not guidance.update_teacher or self._trajectory_optimizer is None:
            return
        teacher = self._models["trajectory"]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for param in teacher.parameters():
                if param.grad is not None:
                    dist.all_reduce(param.grad, op=dist.ReduceOp.AVG)
        self._trajectory_optimizer.step()
        self._trajectory_optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        if self._trajectory_optimizer is None:
            return {}
        return {
            "trajectory_model": self._models["trajectory"].state_dict(),
            "trajectory_optimizer": self._trajectory_optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state and self._trajectory_optimizer is not None:
            self._models["trajectory"].load_state_dict(state["trajectory_model"])
            self._trajectory_optimizer.load_state_dict(state["trajectory_optimizer"])
