"""SET (Mocanu et al. 2018): drop the smallest weights, regrow at random positions.

Randomness comes from a generator seeded by (seed, parameter name, step), so every rank of a
distributed run, and a run resumed from a checkpoint, draws the same positions.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .engine import MaskEngine, SparseWeight, name_seed
from .schedules import UpdateSchedule


class SET(MaskEngine):
    """Dynamic sparse training with random regrowth (Sparse Evolutionary Training).

    Same arguments and schedule as `RigL`; no dense gradient is needed.
    """

    method = "set"

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int,
                 update_interval: int = 100, drop_fraction: float = 0.3, end_fraction: float = 0.75,
                 pattern: str = "unstructured", *, n: Optional[int] = None, m: Optional[int] = None,
                 seed: int = 0) -> None:
        schedule = UpdateSchedule(total_steps, update_interval, drop_fraction, end_fraction)
        super().__init__(module, optimizer, schedule, pattern, n, m, seed)

    def grow_scores(self, w: SparseWeight, step: int) -> Optional[torch.Tensor]:
        gen = torch.Generator().manual_seed(name_seed(self.seed, w.name, step))
        return torch.rand(tuple(w.param.shape), generator=gen).to(w.param.device)
