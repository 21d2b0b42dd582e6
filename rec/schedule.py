"""The learning-rate schedule of the training loop (plain Python, no Ray).

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, steps_per_epoch))

multiplier(step) = min(1, (step + 1) / warmup)                                 constant
                 = min(1, (step + 1) / warmup) * (1 + cos(pi * progress)) / 2  cosine
progress = (step - warmup) / (total - warmup) clipped to [0, 1], total = max_steps or
epochs * steps_per_epoch: a linear warm-up, then constant or cosine down to 0 at the last step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from rec.train_config import TrainConfig


def lr_lambda(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Optimizer step -> LR multiplier (module docstring)."""
    warmup = max(1, cfg.warmup_steps)
    total = max(warmup + 1, cfg.max_steps or cfg.epochs * steps_per_epoch)

    def factor(step: int) -> float:
        ramp = min(1.0, (step + 1) / warmup)
        if cfg.lr_schedule == "constant":
            return ramp
        progress = min(1.0, max(0, step - warmup) / (total - warmup))
        return ramp * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
