"""Learning-rate schedules that fine-tuning recipes use and torch lacks as one class."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosineLR(LambdaLR):
    """Linear warm-up from 0, then cosine decay to ``min_lr_ratio`` × the base rate (the QLoRA/LitGPT schedule).

    Stepped once per optimizer step.

    Args:
        optimizer: the optimizer whose learning rates are scheduled.
        warmup_steps: steps of linear warm-up.
        total_steps: length of the schedule; ``None`` lets ``QLitModule`` fill in the trainer's estimated
            number of optimizer steps.
        min_lr_ratio: final learning rate as a fraction of the base rate.
    """

    def __init__(
        self, optimizer: Optimizer, warmup_steps: int = 0, total_steps: int | None = None, min_lr_ratio: float = 0.0
    ) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, self._factor)

    def _factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        total = self.total_steps or step + 1
        progress = min(1.0, (step - self.warmup_steps) / max(1, total - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
