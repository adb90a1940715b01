"""Sparse Parallel: ``y = W x`` -> ``y = sum_j sigma(W_j x)``, B sparse branches.

B = round(1 / (1 - s)) and each branch keeps density 1/B, so the layer costs what the dense one
did (paper Section 3; spec "Rounding"). sigma is BatchNorm + ReLU for convs and the model's
activation for linears. What stays dense: see `LayerAnalysis`; shortcut projections are masked
at s, not copied.

::

    x -> conv(64->64)  ==>  x -+-> conv_0 -> BN -> ReLU -+
                               +-> conv_1 -> BN -> ReLU -+-> sum
                               +-> ...     (B branches) -+
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch.nn as nn

from ..sparsity.layers import new_layer
from .rewrite import LayerRewritePass, LayerStandIn


class SparseBranch(nn.Module):
    """sigma(W_j x): one sparse layer followed by its norm and activation."""

    def __init__(self, layer: nn.Module, norm: Optional[nn.Module], act: nn.Module) -> None:
        super().__init__()
        self.layer, self.norm, self.act = layer, norm, act

    def forward(self, x):
        y = self.layer(x)
        if self.norm is not None:
            y = self.norm(y)
        return self.act(y)


class ParallelBranches(LayerStandIn, nn.Module):
    """sum_j sigma(W_j x) over its branches."""

    sift_rule = "sparse-parallel"  # nodes inside it belong to this rule (capture.normalize.annotate_provenance)
    traced_by_structure = True  # forward depends on the branch count only (graph_edit)

    def __init__(self, branches: List[SparseBranch]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x):
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out


def num_branches(sparsity: float) -> int:
    """B = round(1 / (1 - s)), at least 1 (s = 0.6 gives 2: Python rounds half to even)."""
    return max(1, int(round(1.0 / (1.0 - sparsity))))


class SparseParallelPass(LayerRewritePass):
    """Replace every transformable Linear/Conv with B parallel sparse branches."""

    name = "sparse-parallel"
    transform = "parallel"
    export_forms = True  # its branches can be stacked into one layer at export (exporters.forms)

    def build(self, unit, layer, module) -> Tuple[nn.Module, str]:
        count = num_branches(self.sparsity) if self.capacity is None else max(1, int(round(self.capacity)))
        branches = []
        for _ in range(count):
            sparse = new_layer(module)
            sparse.target_density = 1.0 / count
            width = sparse.out_features if isinstance(sparse, nn.Linear) else sparse.out_channels
            norm, act = self.sigma_for(unit, module, width)
            branches.append(SparseBranch(sparse, norm, act))
        ideal = 1.0 / (1.0 - self.sparsity) if self.capacity is None else self.capacity
        what = "1/(1-s)" if self.capacity is None else "capacity"
        note = f"{count} branches" + (f" ({what} = {ideal:.2f} rounded)" if abs(ideal - count) > 1e-9 else "")
        return ParallelBranches(branches).train(module.training), note

