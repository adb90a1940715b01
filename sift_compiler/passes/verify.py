"""VerifyPass: the invariants every pipeline ends with.

1. ``graph.lint()`` passes;
2. the outputs keep the dense model's shapes and dtypes (fake-tensor propagation, no compute);
3. every mask has its weight's shape and exactly round(density * numel) non-zeros, and no layer
   still waits for deferred weight initialisation;
4. iso-FLOP: the weight-layer FLOPs match the dense model's up to what rounding explains, else
   a `PostconditionError`. The compensation solves s' exactly for the integer widths, branches
   and ranks the rewrite chose, so what is left is each mask's integer non-zero count:
   ``exact_count`` rounds ``density * numel`` to the nearest integer, off by at most 1/2 weight,
   and a weight costs ``dense_l / numel_l`` FLOPs in layer l (one term per call of the layer)::

       |F_sift - F_dense| <= sum_l dense_l / (2 numel_l)         (`rounding_bound`)

   plus 1e-9 relative for floating point. When the compensation had to cap the density at 1
   (the integer sizes already cost less than the dense model), the model is under budget by
   that much and only a ratio above 1 is an error. ``flop_tolerance`` in the config replaces
   the bound with a fixed ``|sift/dense - 1|``. The report's notes carry the measured ratio
   either way. Results not meant to be iso-FLOP (``budget="latency"``, an explicit
   ``capacity``, the dense baseline) are not checked (`CompileConfig.iso_flop`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..analyses.flops import FlopAnalysis, FlopCounts, mask_nnz
from ..config import CompileConfig
from ..analyses.layers import LayerAnalysis
from ..analyses.shapes import ShapeAnalysis
from ..errors import PassError, PostconditionError, at_node
from ..sparsity.init import exact_count
from ..sparsity.layers import iter_masked
from .base import Pass, PassResult


_FLOAT_SLACK = 1e-9  # relative: sums of float FLOP counts in another order


@dataclass(frozen=True)
class VerifyOptions:
    """What VerifyPass checks: iso-FLOP or not, and a fixed tolerance (None: `rounding_bound`)."""

    iso_flop: bool = True
    flop_tolerance: Optional[float] = None

    @staticmethod
    def of(config: CompileConfig) -> "VerifyOptions":
        return VerifyOptions(config.iso_flop, config.flop_tolerance)


def rounding_bound(counts: FlopCounts) -> float:
    """The largest |F_sift - F_dense| per-mask rounding explains, in FLOPs (see the module docstring)."""
    return sum(0.5 * n.dense / n.numel for n in counts.nodes.values()
               if n.category == "weight" and n.numel > 0 and n.nnz < n.numel)


class VerifyPass(Pass):
    """Check the invariants of the module docstring; changes nothing."""

    name = "verify"

    def __init__(self, options: VerifyOptions = VerifyOptions()) -> None:
        self.options = options

    def call(self, unit) -> PassResult:
        unit.module.graph.lint()
        outputs = unit.analyses.get(ShapeAnalysis).outputs(unit.module)
        if unit.baseline_outputs is not None and outputs != unit.baseline_outputs:
            raise PassError(f"output shapes changed: {outputs} instead of {unit.baseline_outputs}")
        calls = {str(n.target): n for n in unit.module.graph.nodes if n.op == "call_module"}
        for name, layer in [] if unit.on_meta else iter_masked(unit.module):  # on meta: planned, not drawn
            try:
                self._check_mask(name, layer)
            except PassError as e:  # the pass manager names the layer's call and its source line
                raise at_node(e, calls[name]) if name in calls else e
        counts = unit.analyses.get(FlopAnalysis)
        if unit.baseline is not None and self.options.iso_flop and unit.baseline.weight_dense > 0:
            self._check_iso_flop(unit, counts, self.options)
        return PassResult(False, frozenset({ShapeAnalysis, FlopAnalysis, LayerAnalysis}))

    @staticmethod
    def _check_mask(name: str, layer) -> None:
        """Weights drawn, and a mask of the weight's shape with exactly round(density * numel) non-zeros."""
        if layer.init_pending:
            raise PassError(f"weights of {name!r} were never initialised: a rewrite ran with defer_init=True "
                            "but no InitMasksPass followed it in the pipeline")
        if layer.weight_mask.shape != layer.weight.shape:
            raise PassError(f"mask of {name!r} has shape {tuple(layer.weight_mask.shape)}, weight "
                            f"{tuple(layer.weight.shape)}")
        expected = exact_count(layer.target_density, layer.weight.numel())
        actual = mask_nnz(layer.weight_mask)
        if layer.target_density < 1 and actual != expected:
            raise PassError(f"mask of {name!r} has {actual} non-zeros, expected {expected}")

    @staticmethod
    def _check_iso_flop(unit, counts: FlopCounts, options: VerifyOptions) -> None:
        target = unit.baseline.weight_dense
        ratio = counts.weight_effective / target
        if options.flop_tolerance is not None:
            allowed, how = options.flop_tolerance, f"flop_tolerance {options.flop_tolerance:g}"
        else:
            allowed, how = rounding_bound(counts) / target + _FLOAT_SLACK, "what mask rounding explains"
        # compensation capped the density at 1 (s' = 0): the integer sizes are under budget by design
        capped = unit.effective_sparsity is not None and unit.effective_sparsity <= 0.0
        miss = ratio - 1 if capped else abs(ratio - 1)
        if abs(ratio - 1) > 1e-6:
            unit.notes.append(f"iso-FLOP: sift/dense = {ratio:.6f} (allowed: {allowed:.3g}, {how})")
        if miss > allowed:
            raise PostconditionError(f"not iso-FLOP: sift/dense = {ratio:.6f}, |sift/dense - 1| = {abs(ratio - 1):.3g} "
                                     f"exceeds {allowed:.3g} ({how}); pass flop_tolerance= (--flop-tolerance) to "
                                     "accept it")
