"""The FLOP report: per layer and in total, dense against sift, as a table and as JSON.

All numbers are forward FLOPs per sample (2 x MAC; conventions in `analyses.flops`).
``dense_flops``/``sift_flops`` cover weight layers only (the iso-FLOP target);
``total_*`` cover every op, attention and norms included.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import torch.fx as fx

from .analyses.flops import CATEGORIES, FlopAnalysis, FlopCounts, routed_shares
from .analyses.layers import LayerTable
from .sparsity.counts import count_parameters
from .unit import CompilationUnit, LayerDecision


@dataclass
class LayerReport:
    name: str
    kind: str
    shape: List[int]
    dense_flops: float
    sift_flops: float
    sparsity: float
    kept_dense: bool
    reason: str
    transform: str
    detail: str = ""


@dataclass
class FlopReport:
    """What the compiler did and what it costs; ``table()`` for people, ``to_json()`` for tools."""

    transform: str
    sparsity: float
    effective_sparsity: Optional[float]
    dense_flops: float
    sift_flops: float
    total_dense_flops: float
    total_sift_flops: float
    categories: Dict[str, Dict[str, float]]
    layers: List[LayerReport]
    input_shape: List[int] = field(default_factory=list)
    input_dtype: str = "float32"
    model: str = ""
    capture: str = ""
    notes: List[str] = field(default_factory=list)
    uncounted_ops: List[str] = field(default_factory=list)
    budget: str = "flops"             # "latency": sized by measured latency, not iso-FLOP (sift_compiler.latency)
    capacity: Optional[float] = None  # the transform's size when set instead of the iso-FLOP formula
    # {"dense"|"sift": {"total", "active", "nonzero", "active_nonzero", "masks"}} (`sparsity.count_parameters`):
    # parameters without the masks; active = what one token uses (top_k of num_experts experts in a mixture of experts);
    # masks (bool parameters, so FSDP2 shards them) are counted apart, never as parameters
    parameters: Dict[str, Dict[str, int]] = field(default_factory=dict)

    @property
    def flop_ratio(self) -> float:
        return self.sift_flops / self.dense_flops if self.dense_flops else 1.0

    @property
    def tokens_per_sample(self) -> int:
        """The sequence length for token-id inputs (batch, sequence), else 0."""
        integer = self.input_dtype.startswith(("int", "uint"))
        return int(self.input_shape[1]) if integer and len(self.input_shape) == 2 else 0

    @property
    def total_flop_ratio(self) -> float:
        return self.total_sift_flops / self.total_dense_flops if self.total_dense_flops else 1.0

    def to_dict(self) -> Dict[str, Any]:
        data = asdict(self)
        data["flop_ratio"] = self.flop_ratio
        data["total_flop_ratio"] = self.total_flop_ratio
        if self.tokens_per_sample:
            data["flops_per_token"] = {"dense": self.dense_flops / self.tokens_per_sample,
                                       "sift": self.sift_flops / self.tokens_per_sample,
                                       "total_dense": self.total_dense_flops / self.tokens_per_sample,
                                       "total_sift": self.total_sift_flops / self.tokens_per_sample}
        return data

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def table(self, max_layers: Optional[int] = None) -> str:
        """A fixed-width table: one row per weight layer, then totals by category."""
        head = (f"model {self.model or '?'} | transform {self.transform} | s = {self.sparsity:g}"
                + (f" (budget latency{'' if self.capacity is None else f', capacity {self.capacity:g}'})"
                   if self.budget == "latency" else
                   f" (compensated s' = {self.effective_sparsity:.4f})" if self.effective_sparsity is not None else "")
                + f" | input {','.join(map(str, self.input_shape))} {self.input_dtype} | capture {self.capture}")
        width = max([len("layer")] + [len(layer.name) for layer in self.layers])
        kind_width = max([len("kind")] + [len(layer.kind) for layer in self.layers])
        rows = [head, "",
                f"{'layer':<{width}}  {'kind':<{kind_width}}  {'dense MFLOPs':>12}  {'sift MFLOPs':>12}  "
                f"{'sparsity':>8}  what happened"]
        layers = self.layers if max_layers is None else self.layers[:max_layers]
        for layer in layers:
            what = f"kept dense: {layer.reason}" if layer.kept_dense else f"{layer.transform}: {layer.detail}"
            rows.append(f"{layer.name:<{width}}  {layer.kind:<{kind_width}}  {layer.dense_flops / 1e6:>12.2f}  "
                        f"{layer.sift_flops / 1e6:>12.2f}  {layer.sparsity:>8.4f}  {what}")
        if max_layers is not None and len(self.layers) > max_layers:
            rows.append(f"... {len(self.layers) - max_layers} more layers (see --report JSON)")
        rows += ["", f"{'FLOPs per sample':<22}{'dense':>14}{'sift':>14}{'ratio':>9}"]
        for category in CATEGORIES:
            dense, sift = self.categories["dense"][category], self.categories["sift"][category]
            if dense or sift:
                rows.append(f"{category:<22}{_fmt(dense):>14}{_fmt(sift):>14}{_ratio(sift, dense):>9}")
        rows.append(f"{'all ops':<22}{_fmt(self.total_dense_flops):>14}{_fmt(self.total_sift_flops):>14}"
                     f"{_ratio(self.total_sift_flops, self.total_dense_flops):>9}")
        tokens = self.tokens_per_sample
        if tokens:
            rows.append(f"{'per token (weight)':<22}{_fmt(self.dense_flops / tokens):>14}{_fmt(self.sift_flops / tokens):>14}"
                        f"{_ratio(self.sift_flops, self.dense_flops):>9}")
            rows.append(f"{'per token (all ops)':<22}{_fmt(self.total_dense_flops / tokens):>14}"
                        f"{_fmt(self.total_sift_flops / tokens):>14}"
                        f"{_ratio(self.total_sift_flops, self.total_dense_flops):>9}")
        rows += self._parameter_rows()
        if self.budget == "latency":
            rows.append(f"FLOP ratio (weight layers, sift/dense; budget latency, not iso-FLOP): {self.flop_ratio:.4f}")
        else:
            rows.append(f"iso-FLOP ratio (weight layers, sift/dense): {self.flop_ratio:.4f}")
        rows += [f"note: {n}" for n in self.notes]
        if self.uncounted_ops:
            rows.append(f"note: ops not counted (no FLOP rule): {', '.join(self.uncounted_ops)}")
        return "\n".join(rows)


    def _parameter_rows(self) -> List[str]:
        if not self.parameters:
            return []
        masks = self.parameters["sift"].get("masks", 0)
        rows = [f"{'parameters':<22}{'dense':>14}{'sift':>14}{'non-zero':>11}"
                + (f"  (the {_fmt(masks)} mask entries are not parameters)" if masks else "")]
        for key, label in (("total", "total"), ("active", "active per token")):
            dense, sift = self.parameters["dense"], self.parameters["sift"]
            nonzero = sift["nonzero" if key == "total" else "active_nonzero"]
            rows.append(f"{label:<22}{_fmt(dense[key]):>14}{_fmt(sift[key]):>14}{_fmt(nonzero):>11}")
        return rows


def _fmt(flops: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(flops) >= scale:
            return f"{flops / scale:.3f} {unit}"
    return f"{flops:.0f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.4f}" if b else "-"


def origin_of(gm: fx.GraphModule, node: fx.Node) -> str:
    """The original layer a node came from (itself for untouched nodes)."""
    return node.meta.get("sift.origin", str(node.target) if node.op == "call_module" else node.name)


def build_report(unit, baseline_layers: LayerTable, final: FlopCounts, model: str = "", capture: str = "") -> FlopReport:
    baseline: FlopCounts = unit.baseline
    gm = unit.module
    by_origin: Dict[str, List[Any]] = {}
    for node in gm.graph.nodes:
        entry = final.nodes.get(node.name)
        if entry is not None and entry.category == "weight":
            by_origin.setdefault(origin_of(gm, node), []).append(entry)
    layers = []
    for target, layer in baseline_layers.layers.items():
        if layer.kind not in ("linear", "conv", "conv_transpose"):
            continue
        dense = sum(baseline.nodes[n].dense for n in layer.nodes)
        new = by_origin.get(target, [])
        decision = unit.decisions.get(target)
        masked = [e for e in new if e.nnz < e.numel]
        if decision is None and masked:  # a compiled model measured as it is
            decision = LayerDecision("masked", f"density {sum(e.nnz for e in masked) / sum(e.numel for e in masked):.4f}")
        reason = layer.dense_reason(unit.config.transform) or ""
        kept = decision is None or decision.transform == "kept"
        if decision is not None and kept and decision.detail:
            reason = f"{reason}; {decision.detail}"
        sparsity = 1.0 - sum(e.nnz for e in masked) / sum(e.numel for e in masked) if masked else 0.0
        layers.append(LayerReport(
            name=target, kind=layer.describe, shape=list(layer.weight_shape), dense_flops=dense,
            sift_flops=sum(e.effective for e in new), sparsity=round(sparsity, 6), kept_dense=kept,
            reason=reason if kept else "", transform=decision.transform if decision else "kept",
            detail=decision.detail if decision else ""))
    return FlopReport(
        transform=unit.config.transform, sparsity=unit.config.sparsity,
        effective_sparsity=unit.effective_sparsity, dense_flops=baseline.weight_dense,
        sift_flops=final.weight_effective, total_dense_flops=baseline.total(effective=True),
        total_sift_flops=final.total(effective=True),
        categories={"dense": baseline.by_category(), "sift": final.by_category()}, layers=layers,
        input_shape=list(_input_shape(unit)), input_dtype=_input_dtype(unit), model=model, capture=capture,
        notes=list(unit.notes), uncounted_ops=list(final.uncounted), budget=unit.config.budget,
        capacity=unit.config.capacity, parameters=_parameters(unit))


def _parameters(unit) -> Dict[str, Dict[str, int]]:
    dense = unit.dense_baseline.parameters if unit.dense_baseline is not None else None
    if dense is None:
        return {}
    return {"dense": asdict(dense), "sift": asdict(count_parameters(unit.module, routed_shares(unit.module)))}


def _input_shape(unit):
    first = next((x for x in unit.flat_inputs() if hasattr(x, "shape")), None)
    return tuple(first.shape) if first is not None else ()


def _input_dtype(unit) -> str:
    first = next((x for x in unit.flat_inputs() if hasattr(x, "dtype")), None)
    return str(first.dtype).replace("torch.", "") if first is not None else ""


def current_report(unit: CompilationUnit, model_name: str, capture_method: str) -> FlopReport:
    """The report of a unit as it is now (after passes, or after loading new masks)."""
    return build_report(unit, unit.baseline_layers, unit.analyses.get(FlopAnalysis), model=model_name,
                        capture=capture_method)
