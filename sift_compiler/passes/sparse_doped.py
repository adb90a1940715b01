"""Sparse Doped: ``y = W x`` -> ``y = V U x + M x``, U V dense of rank r, M full-size sparse.

r = s D_in D_out / (D_in + D_out) (k D_in for convs) makes it iso-FLOP with M at density 1 - s.
U and V stay dense (the reference code also masks them, which leaves the model at 0.75 / 0.44 /
0.20 of the dense FLOPs: not iso-FLOP, not copied). M starts from the original layer's weights,
so at s = 0 (r = 0) the layer is the dense layer itself. There is no sigma between U and V.

::

    x -> conv (D_in->D_out)  ==>  x -+-> M (sparse, D_in->D_out) ---------------+-> sum
                                     +-> U kxk (D_in->r) -> V 1x1 (r->D_out) ---+
"""
from __future__ import annotations

from typing import Tuple

import torch.nn as nn

from ..initialization import mark_copy
from ..sparsity.layers import masked_copy
from .rewrite import LayerRewritePass, LayerStandIn, fan, low_rank_pair, round_to_multiple


class DopedLayer(LayerStandIn, nn.Module):
    """M x + V U x."""

    sift_rule = "sparse-doped"  # nodes inside it belong to this rule (capture.normalize.annotate_provenance)
    traced_by_structure = True  # forward depends on its submodules only (graph_edit)

    def __init__(self, m: nn.Module, u: nn.Module, v: nn.Module) -> None:
        super().__init__()
        self.m, self.u, self.v = m, u, v

    def forward(self, x):
        return self.m(x) + self.v(self.u(x))


def doping_rank(d_in: int, d_out: int, kernel: int, sparsity: float) -> float:
    """r = s k D_in D_out / (k D_in + D_out), before rounding."""
    return sparsity * kernel * d_in * d_out / (kernel * d_in + d_out)


class SparseDopedPass(LayerRewritePass):
    """Replace every transformable Linear/Conv with a dense low-rank UV plus a sparse M."""

    name = "sparse-doped"
    transform = "doped"

    def build(self, unit, layer, module) -> Tuple[nn.Module, str]:
        d_in, d_out, kernel, groups = fan(module)
        ideal = doping_rank(d_in, d_out, kernel, self.sparsity) * (self.capacity or 1.0)
        rank = round_to_multiple(ideal, groups)
        m = mark_copy(masked_copy(module), layer.target)
        m.target_density = 1.0 - self.sparsity
        if rank == 0:
            return m, f"r=0 (ideal {ideal:.2f}): M only"
        u, v = low_rank_pair(module, rank, masked=False, v_bias=False)
        return DopedLayer(m, u, v).train(module.training), f"r={rank} (ideal {ideal:.1f})"
