"""Learning-rate, weight-decay and EMA-momentum schedules as pure functions of the step.

The reference keeps them as stateful objects / a generator advanced once per iteration
(and fast-forwarded ``epoch * ipe`` times on resume). Here each value is a function of
the global step, with the reference's formulas evaluated in the same float order, so the
numbers are identical and resuming needs nothing but the step count.

Step convention: ``step`` is the 0-based index of the optimizer step about to run. The
reference's lr/wd schedulers are stepped at the start of each iteration, so they see
``s = step + 1``; the momentum generator yields its ``step``-th value after the update.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedules:
    ipe: int                 # iterations (optimizer steps) per epoch
    epochs: int
    warmup: float            # epochs
    start_lr: float
    ref_lr: float
    final_lr: float
    ref_wd: float
    final_wd: float
    ema: tuple
    ipe_scale: float = 1.0

    @classmethod
    def from_config(cls, cfg, ipe: int) -> "Schedules":
        o = cfg.optimization
        return cls(ipe=ipe, epochs=o.epochs, warmup=o.warmup, start_lr=o.start_lr, ref_lr=o.lr,
                   final_lr=o.final_lr, ref_wd=o.weight_decay, final_wd=o.final_weight_decay,
                   ema=tuple(o.ema), ipe_scale=o.ipe_scale)

    @property
    def total_steps(self) -> int:
        return int(self.ipe_scale * self.epochs * self.ipe)

    @property
    def warmup_steps(self) -> int:
        return int(self.warmup * self.ipe)

    def lr(self, step: int) -> float:
        s = float(step + 1)
        w = self.warmup_steps
        if s < w:
            progress = s / float(max(1, w))
            return self.start_lr + progress * (self.ref_lr - self.start_lr)
        t_max = self.total_steps - w
        progress = float(s - w) / float(max(1, t_max))
        return max(self.final_lr,
                   self.final_lr + (self.ref_lr - self.final_lr) * 0.5 * (1. + math.cos(math.pi * progress)))

    def wd(self, step: int) -> float:
        s = float(step + 1)
        progress = s / self.total_steps
        new = self.final_wd + (self.ref_wd - self.final_wd) * 0.5 * (1. + math.cos(math.pi * progress))
        return max(self.final_wd, new) if self.final_wd <= self.ref_wd else min(self.final_wd, new)

    def momentum(self, step: int) -> float:
        e0, e1 = self.ema
        return e0 + step * (e1 - e0) / (self.ipe * self.epochs * self.ipe_scale)


def apply_lr_wd(optimizer, lr: float, wd: float) -> None:
    """Set lr on every group and wd on the groups not flagged ``WD_exclude`` (the reference's rule)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if not group.get("WD_exclude", False):
            group["weight_decay"] = wd
