"""Teachers held in the training worker's own process: tiny runs, tests, and the reference the
served teachers (raylin.teacher.pool) must match exactly.

Same interface as the service: ``submit(request)`` then ``result(step)``; here the work happens in
``result``, in the order the loop asks. Each worker trains its own copy of the trajectory teacher
on its micro-batch; gradients are averaged across workers before every teacher step, so all copies
follow the same path on the same global batches.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from raylin.teacher.bank import TeacherBank, TeacherOutput, TeacherRequest, TeacherSpec


def _average_gradients(model: torch.nn.Module) -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for param in model.parameters():
            if param.grad is not None:
                dist.all_reduce(param.grad, op=dist.ReduceOp.AVG)


class InProcessTeachers:
    """The run's teachers in this process (``load(path)`` returns a transformers model with the task head)."""

    def __init__(self, spec: TeacherSpec, load, device: torch.device):
        self.bank = TeacherBank(spec, load, device, grad_sync=_average_gradients)
        self._pending: dict[int, TeacherRequest] = {}

    def submit(self, request: TeacherRequest) -> None:
        # Each worker trains its own trajectory copy on its micro-batch (gradients averaged at the step).
        request.micro_batches = 1
        self._pending[request.step] = request

    def result(self, step: int) -> TeacherOutput:
        return self.bank.compute(self._pending.pop(step))

    def state_dict(self) -> dict:
        return self.bank.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.bank.load_state_dict(state)

    def stats(self) -> dict[str, int]:
        return self.bank.stats()

    def close(self) -> None:
        self._pending.clear()
