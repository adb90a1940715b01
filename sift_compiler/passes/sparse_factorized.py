"""Sparse Factorized: ``y = W x`` -> ``y = V sigma(U x)``, U and V sparse, hidden width h.

h = D_in D_out / ((1 - s)(D_in + D_out)) makes the pair iso-FLOP at density 1 - s (for convs
D_in counts the kernel: k_h k_w D_in). U is a k x k conv that carries stride, padding, dilation
and groups; V is a 1x1 conv (for linears: two Linears). sigma is BatchNorm + ReLU for convs and
the model's activation for linears. h is rounded to the nearest multiple of the groups; the
global compensation pays for the rounding.

::

    x -> conv kxk (D_in->D_out)  ==>  x -> U kxk (D_in->h) -> BN -> ReLU -> V 1x1 (h->D_out)
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch.nn as nn

from .rewrite import LayerRewritePass, LayerStandIn, fan, low_rank_pair, round_to_multiple


class FactorizedLayer(LayerStandIn, nn.Module):
    """V sigma(U x)."""

    sift_rule = "sparse-factorized"  # nodes inside it belong to this rule (capture.normalize.annotate_provenance)
    traced_by_structure = True  # forward depends on which submodules exist only (graph_edit)

    def __init__(self, u: nn.Module, norm: Optional[nn.Module], act: nn.Module, v: nn.Module) -> None:
        super().__init__()
        self.u, self.norm, self.act, self.v = u, norm, act, v

    def forward(self, x):
        h = self.u(x)
        if self.norm is not None:
            h = self.norm(h)
        return self.v(self.act(h))


def hidden_width(d_in: int, d_out: int, kernel: int, sparsity: float) -> float:
    """h = k D_in D_out / ((1 - s)(k D_in + D_out)), before rounding."""
    return kernel * d_in * d_out / ((1.0 - sparsity) * (kernel * d_in + d_out))


class SparseFactorizedPass(LayerRewritePass):
    """Replace every transformable Linear/Conv with a sparse U -> sigma -> sparse V pair."""

    name = "sparse-factorized"
    transform = "factorized"

    def build(self, unit, layer, module) -> Tuple[nn.Module, str]:
        d_in, d_out, kernel, groups = fan(module)
        ideal = hidden_width(d_in, d_out, kernel, self.sparsity) * (self.capacity or 1.0)
        h = round_to_multiple(ideal, groups, minimum=groups)
        density = 1.0 - self.sparsity
        u, v = low_rank_pair(module, h, masked=True)
        u.target_density = v.target_density = density
        norm, act = self.sigma_for(unit, module, h)
        return FactorizedLayer(u, norm, act, v).train(module.training), f"h={h} (ideal {ideal:.1f})"
