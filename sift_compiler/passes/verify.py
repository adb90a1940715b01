"""VerifyPass: the invariants every pipeline ends with.

1. ``graph.lint()`` passes;
2. the outputs keep the dense model's shapes and dtypes (fake-tensor propagation, no compute);
3. every mask has its weight's shape and exactly round(density * numel) non-zeros, and no layer
   still waits for deferred weight initialisation;
4. the weight-layer FLOPs are within ``flop_tolerance`` of the dense model's (iso-FLOP). Tiny
   models whose per-layer rounding cannot reach the tolerance get a note, not an error; with
   ``budget="latency"`` the model is not iso-FLOP by design and nothing is checked.
"""
from __future__ import annotations

from ..analyses.flops import FlopAnalysis, mask_nnz
from ..analyses.layers import LayerAnalysis
from ..analyses.shapes import ShapeAnalysis
from ..errors import PassError
from ..sparsity.init import exact_count
from ..sparsity.layers import iter_masked
from .base import Pass, PassResult


class VerifyPass(Pass):
    name = "verify"

    def call(self, unit) -> PassResult:
        unit.module.graph.lint()
        outputs = unit.analyses.get(ShapeAnalysis).outputs(unit.module)
        if unit.baseline_outputs is not None and outputs != unit.baseline_outputs:
            raise PassError(f"output shapes changed: {outputs} instead of {unit.baseline_outputs}")
        for name, layer in [] if unit.on_meta else iter_masked(unit.module):  # on meta: planned, not drawn
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
        counts = unit.analyses.get(FlopAnalysis)
        if unit.baseline is not None and unit.config.transform != "none" and unit.baseline.weight_dense > 0:
            ratio = counts.weight_effective / unit.baseline.weight_dense
            if unit.config.budget == "latency":  # not iso-FLOP by design: the report shows the ratio
                pass
            elif abs(ratio - 1) > unit.config.flop_tolerance:
                unit.notes.append(f"iso-FLOP tolerance missed: sift/dense = {ratio:.4f} (layers too small for "
                                  "exact per-layer counts)")
        return PassResult(False, frozenset({ShapeAnalysis, FlopAnalysis, LayerAnalysis}))
