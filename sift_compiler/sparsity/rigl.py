"""RigL (Evci et al. 2020): drop the smallest weights, regrow where the dense gradient is largest.

The dense gradient dL/d(W * M) comes from the step that ends with the update: the engine puts
the layers in dense-gradient mode for that step only, so it costs one dense weight-gradient
product every ``update_interval`` steps (the reference's training-FLOP formula counts the same).
"""
from __future__ import annotations

from typing import Optional

import torch

from .engine import DynamicMaskEngine, SparseWeight


class RigL(DynamicMaskEngine):
    """Dynamic sparse training with gradient-based regrowth, the paper's best method.

    >>> masks = sift_compiler.sparsity.RigL(result.module, optimizer, total_steps=len(loader) * epochs)
    >>> ...; optimizer.step(); masks.step(); optimizer.zero_grad()

    ``total_steps``: optimizer steps in the whole run; updates every ``update_interval`` steps
    until ``end_fraction`` of them, dropping ``drop_fraction`` (cosine-decayed) of each layer's
    weights. ``pattern="nm"`` with ``n``, ``m`` keeps transposable N:M masks. ``seed`` seeds the
    N:M initial masks (every rank of a distributed run must pass the same seed).
    """

    method = "rigl"
    needs_dense_grad = True

    def grow_scores(self, w: SparseWeight, step: int) -> Optional[torch.Tensor]:
        grad = self.dense_grads.get(w.name)
        return None if grad is None else grad.abs()
