"""When masks change and by how much: the paper's update schedule with a cosine drop fraction.

Steps are counted by the engine's ``step()`` calls, one per optimizer step: after step t
(t = 1, 2, ...) the masks update when ``t % update_interval == 0`` and ``t < end_step``, with
``end_step = int(end_fraction * total_steps)``. The fraction of each layer's active weights that
is dropped (and regrown) at such a step decays by a cosine from ``drop_fraction`` to zero::

    alpha(t) = drop_fraction * (1 + cos(pi * t / end_step)) / 2

Paper and reference defaults: every 100 steps, until 75% of training, drop fraction 0.3.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List

from ..errors import UserInputError


@dataclass(frozen=True)
class UpdateSchedule:
    """The mask-update schedule of a dynamic-sparse run (validated on construction)."""

    total_steps: int
    update_interval: int = 100
    drop_fraction: float = 0.3
    end_fraction: float = 0.75

    def __post_init__(self) -> None:
        for name in ("total_steps", "update_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserInputError(f"{name} must be a positive integer (optimizer steps), got {value!r}")
        if self.total_steps < self.update_interval:
            raise UserInputError(
                f"total_steps ({self.total_steps}) is smaller than update_interval ({self.update_interval}): the "
                f"masks would never change; lower update_interval or use Static(module, optimizer)")
        if not isinstance(self.drop_fraction, (int, float)) or not 0 < self.drop_fraction <= 1:
            raise UserInputError(f"drop_fraction must lie in (0, 1], got {self.drop_fraction!r}")
        if not isinstance(self.end_fraction, (int, float)) or not 0 < self.end_fraction <= 1:
            raise UserInputError(f"end_fraction must lie in (0, 1] (fraction of training with mask updates), "
                                 f"got {self.end_fraction!r}")
        if self.update_interval >= self.end_step:
            raise UserInputError(
                f"no mask update would happen: updates stop at step {self.end_step} (end_fraction "
                f"{self.end_fraction} x total_steps {self.total_steps}) and the first one is at step "
                f"{self.update_interval}; lower update_interval or raise end_fraction")

    @property
    def end_step(self) -> int:
        """The step at which updates stop (exclusive)."""
        return int(self.end_fraction * self.total_steps)

    def is_update_step(self, step: int) -> bool:
        """True when the masks change after optimizer step ``step`` (1-based)."""
        return 0 < step < self.end_step and step % self.update_interval == 0

    def drop_fraction_at(self, step: int) -> float:
        """alpha(t): the fraction of active weights dropped and regrown at step ``step``."""
        t = min(max(step, 0), self.end_step)
        return self.drop_fraction * (1.0 + math.cos(math.pi * t / self.end_step)) / 2.0

    def update_steps(self) -> List[int]:
        """Every step at which the masks change."""
        return list(range(self.update_interval, self.end_step, self.update_interval))
