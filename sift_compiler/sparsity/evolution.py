"""SET (Mocanu et al. 2018): drop the smallest weights, regrow at random positions.

Randomness comes from a generator seeded by (seed, parameter name, step), so every rank of a
distributed run, and a run resumed from a checkpoint, draws the same positions.
"""
from __future__ import annotations

from typing import Optional

import torch

from .engine import DynamicMaskEngine, SparseWeight, name_seed


class SET(DynamicMaskEngine):
    """Dynamic sparse training with random regrowth (Sparse Evolutionary Training).

    Same arguments and schedule as `RigL`; no dense gradient is needed.
    """

    method = "set"

    def grow_scores(self, w: SparseWeight, step: int) -> Optional[torch.Tensor]:
        gen = torch.Generator().manual_seed(name_seed(self.seed, w.name, step))
        return torch.rand(tuple(w.param.shape), generator=gen).to(w.param.device)
