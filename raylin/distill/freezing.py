"""XATL freezing: copied weights start frozen and unfreeze by the Loss Improvement Threshold.

LIT averages the training loss over windows of ``window`` steps; each time the relative
improvement between consecutive windows, (L_prev - L_cur) / L_prev, falls below ``threshold``
it counts a strike, and at ``patience`` strikes the copied weights unfreeze (XATL used
threshold 0.01 / patience 1 and 0.005 / patience 2). The unfrozen group then warms up over
``warmup_steps`` on its own before following the main schedule.

Freezing is expressed as a learning-rate multiplier for the copied-parameter group (0 while
frozen) plus zeroed gradients, so the optimizer holds every parameter from the start: this works
unchanged under DeepSpeed ZeRO, which partitions its parameter groups once, at initialisation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class LossImprovementThreshold:
    window: int
    threshold: float
    patience: int = 1
    warmup_steps: int = 0
    # state
    window_losses: list[float] = field(default_factory=list)
    previous_mean: float | None = None
    strikes: int = 0
    unfrozen_at: int | None = None

    def __post_init__(self) -> None:
        if self.window < 1 or self.patience < 1 or self.warmup_steps < 0:
            raise ValueError(
                f"LIT needs window >= 1, patience >= 1, warmup_steps >= 0; got {self.window}, {self.patience}, "
                f"{self.warmup_steps}."
            )

    @property
    def frozen(self) -> bool:
        return self.unfrozen_at is None

    def update(self, step: int, loss: float) -> bool:
        """Record the loss of ``step``; return True on the step the copied weights unfreeze."""
        if not self.frozen:
            return False
        self.window_losses.append(float(loss))
        if len(self.window_losses) < self.window:
            return False
        mean = sum(self.window_losses) / len(self.window_losses)
        self.window_losses = []
        if self.previous_mean is not None:
            improvement = (self.previous_mean - mean) / abs(self.previous_mean)
            if improvement < self.threshold:
                self.strikes += 1
        self.previous_mean = mean
        if self.strikes >= self.patience:
            self.unfrozen_at = step + 1  # the copied weights train from the next step on
            return True
        return False

    def lr_multiplier(self, step: int) -> float:
        """Learning-rate multiplier of the copied-parameter group at ``step``."""
        if self.unfrozen_at is None or step < self.unfrozen_at:
            return 0.0
        if self.warmup_steps == 0:
            return 1.0
        return min(1.0, (step - self.unfrozen_at + 1) / self.warmup_steps)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
