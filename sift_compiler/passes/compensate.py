"""Iso-FLOP compensation: one uniform sparsity s' for all sparse layers, in closed form.

    s' = 1 - (F_target - F_dense_after) / F_maskable_after

F_target is the dense model's weight-layer FLOPs, F_dense_after the FLOPs of weight layers that
stay dense after the rewrite (first/last layers, depthwise convs, Doped's U and V) and
F_maskable_after the dense-equivalent FLOPs of the masked layers. Exact because masked FLOPs
scale linearly with density; the reference binary-searches with random masks instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from ..analyses.flops import FlopAnalysis
from ..analyses.layers import LayerAnalysis
from ..analyses.shapes import ShapeAnalysis
from ..config import CompileConfig
from ..errors import PassError, at_node
from ..registry import get_transform
from ..sparsity.layers import MaskedLayer
from .base import Pass, PassResult


@dataclass(frozen=True)
class CompensationOptions:
    """The requested s and the budget ("flops": solve s'; "latency": keep s); the transform, capacity
    and keep-dense patterns only shape the advice when no s' can pay for the dense layers."""

    sparsity: float
    budget: str = "flops"
    iso_flop: bool = True   # the result is meant to cost what the dense model does (`CompileConfig.iso_flop`)
    pattern: str = "unstructured"   # "N:M": the sparse layers stay at exactly N/M (`CompileConfig.pattern`)
    transform: str = "none"
    capacity: Optional[float] = None
    keep_dense: Tuple[str, ...] = ()

    @staticmethod
    def of(config: CompileConfig) -> "CompensationOptions":
        return CompensationOptions(config.sparsity, config.budget, config.iso_flop, config.pattern,
                                   config.transform, config.capacity, tuple(config.keep_dense))


class IsoFlopCompensationPass(Pass):
    """Set every masked layer's target density to 1 - s' (see the module docstring)."""

    name = "iso-flop-compensation"

    def __init__(self, options: CompensationOptions) -> None:
        self.options = options  # the requested s is the options' own: no default

    def requires(self, unit) -> None:
        if unit.baseline is None:
            raise PassError("the dense baseline FLOPs were not recorded before the rewrite")

    def call(self, unit) -> PassResult:
        counts = unit.analyses.get(FlopAnalysis)
        gm = unit.module
        masked_nodes = [n for n in gm.graph.nodes if n.op == "call_module"
                        and isinstance(gm.get_submodule(str(n.target)), MaskedLayer)]
        options = self.options
        if not masked_nodes:
            # nothing to pay with: fine unless the rewrite made the dense layers dearer (Sparse Wide
            # widening a first or last layer's inner side with no sparse layer between them)
            total, target = counts.weight_dense, unit.baseline.weight_dense
            if options.iso_flop and total > target * (1 + 1e-9):
                raise PassError(f"no layer could be made sparse, and the rewrite left dense layers costing "
                                f"{total:.4g} FLOPs, more than the dense model's {target:.4g}: no sparsity can make "
                                "this model iso-FLOP; the model has nothing between its first and last layers to "
                                "transform")
            return PassResult(False)
        if options.budget == "latency" or options.pattern != "unstructured":
            # the latency budget decides the size, or an N:M pattern fixes the density: sparse layers stay at s
            _set_densities(gm, masked_nodes, 1.0 - options.sparsity)
            unit.effective_sparsity = options.sparsity
            why = "budget latency" if options.budget == "latency" else f"pattern {options.pattern}"
            unit.notes.append(f"{why}: sparse layers at s = {options.sparsity:g}, no iso-FLOP compensation")
            unit.touch()
            return PassResult(True, frozenset({ShapeAnalysis, LayerAnalysis}))
        masked_names = {n.name for n in masked_nodes}
        for node in masked_nodes:
            if node.name not in counts.nodes:
                raise at_node(PassError("the FLOP analysis has no count for this sparse layer"), node)
        maskable = sum(counts.nodes[n].dense for n in masked_names)
        dense = {name: f.dense for name, f in counts.nodes.items()
                 if f.category == "weight" and name not in masked_names}
        dense_after = sum(dense.values())
        target = unit.baseline.weight_dense
        budget = target - dense_after
        if budget <= 0:
            raise _over_budget(unit, gm, dense, dense_after, target, options)
        density = budget / maskable
        if density > 1.0:
            unit.notes.append(f"compensation wanted density {density:.4f} > 1; capped at 1 (model under budget)")
            density = 1.0
        _set_densities(gm, masked_nodes, density)
        unit.effective_sparsity = 1.0 - density
        if abs(unit.effective_sparsity - options.sparsity) > 1e-6:
            unit.notes.append(f"compensated sparsity s' = {unit.effective_sparsity:.4f} "
                              f"(requested s = {options.sparsity:g})")
        unit.touch()
        return PassResult(True, frozenset({ShapeAnalysis, LayerAnalysis}))


def _set_densities(gm, masked_nodes, density: float) -> None:
    """Give every masked layer ``density``; a failure names the layer's node (`errors.at_node`)."""
    for node in masked_nodes:
        try:
            gm.get_submodule(str(node.target)).target_density = density
        except Exception as e:
            raise at_node(e, node)


def _over_budget(unit, gm, dense, dense_after: float, target: float, options: CompensationOptions) -> PassError:
    """The error for dense layers that alone cost more than the dense model: what, the costliest
    dense layer (why it is dense, its node and source line) and what to do."""
    transform, sparsity = options.transform, options.sparsity
    costliest = max(dense, key=dense.__getitem__, default=None)
    nodes = {n.name: n for n in gm.graph.nodes}
    node = nodes.get(costliest)
    layer = unit.analyses.get(LayerAnalysis).layers.get(str(node.target)) if node is not None else None
    why = layer.dense_reason(transform) if layer is not None else None
    remedies = ["lower the sparsity"] if options.capacity is None else \
        [f"lower the capacity (now {options.capacity:g})"]
    if get_transform(transform).widens:
        remedies.append("use a transform that does not widen the dense layers (parallel, factorized, doped)")
    if options.keep_dense:
        remedies.append("keep fewer layers dense (--keep-dense)")
    error = PassError(f"{transform} at s = {sparsity:g}: the layers that stay dense already cost {dense_after:.4g} "
                      f"FLOPs, more than the dense model's {target:.4g}: no sparsity can make this model iso-FLOP; "
                      f"{' or '.join(remedies)}"
                      + (f"; the costliest dense layer ({dense[costliest]:.4g} FLOPs"
                         + (f", {why}" if why else "") + ") is" if node is not None else ""))
    return at_node(error, node) if node is not None else error
