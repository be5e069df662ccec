"""The learning rate of a phase, step by step: a linear warm-up, then constant or a cosine to a floor.

A phase's schedule runs over a *span* of optimizer steps: the phase's own steps, or, for phases that
split one task's budget between them (CRAM's ``warmup`` and ``stable``), the whole task, so the cosine
goes once over the task and the second phase goes on where the first stopped (``offset``).

At step ``s`` of the span (0-based), with ``w`` warm-up steps, ``n`` steps in the span and floor ``f``
(a share of the peak learning rate):

- ``s < w``: ``(s + 1) / w``;
- ``constant``: 1;
- ``cosine``: ``f + (1 - f) * (1 + cos(pi * (s - w) / (n - w))) / 2``, which is 1 at the warm-up's
  end and nears ``f`` at the last step (as transformers' ``get_cosine_schedule_with_warmup``, floor 0,
  whose warm-up starts at 0 instead of ``1 / w``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("constant", "cosine")


def check_schedule(name: str, key: str) -> str:
    if name not in SCHEDULES:
        raise ValueError(f"{key}: unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    return name


@dataclass(frozen=True)
class PhaseSchedule:
    """One phase's learning rate: ``lr`` at the peak, ``factor(step)`` times it at the phase's step."""

    lr: float
    total: int  # optimizer steps in the span
    warmup: int = 0  # warm-up steps at the span's start
    schedule: str = "constant"
    floor: float = 0.0  # the cosine's end, as a share of lr
    offset: int = 0  # steps of the span done before this phase

    def __post_init__(self) -> None:
        check_schedule(self.schedule, "schedule")
        if not 0 <= self.floor <= 1:
            raise ValueError(f"model.min_lr_ratio must be in [0, 1], got {self.floor}")

    def factor(self, step: int) -> float:
        s = step + self.offset
        if s < self.warmup:
            return (s + 1) / self.warmup
        if self.schedule == "constant":
            return 1.0
        progress = min(1.0, (s - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))
