"""Draw exact-count random masks for every masked layer at its target density (`sparsity.init`)."""
from __future__ import annotations

from ..analyses.layers import LayerAnalysis
from ..analyses.shapes import ShapeAnalysis
from .base import Pass, PassResult
from ..sparsity.init import init_masks


class InitMasksPass(Pass):
    name = "init-masks"

    def call(self, unit) -> PassResult:
        drawn = init_masks(unit.module, unit.config.seed)
        if drawn:
            unit.touch()
        return PassResult(bool(drawn), frozenset({ShapeAnalysis, LayerAnalysis}))
