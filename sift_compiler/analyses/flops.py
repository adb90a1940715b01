"""FlopAnalysis: forward FLOPs per sample of every node, dense and effective (non-zero weights only).

Conventions (also in docs/architecture.md): FLOPs = 2 x multiply-accumulates. A weight layer
costs ``2 x positions x nnz(W)`` where positions is the number of output vectors (tokens, or
output pixels of a conv; grouped and depthwise convs included) and nnz counts only unmasked
weights; the dense count uses numel(W). Attention (``q k^T`` and ``a v``, matmuls of two
activations, scaled_dot_product_attention) counts ``2 M N K``. BatchNorm counts 2 per element
(inference scale and shift), other norms 5, pooling one per input element read, element-wise
ops one per output element, softmax 3. Embedding lookups, views and copies cost 0. Bias adds are
not counted. Ops not in these rules are listed in ``uncounted`` (never silently skipped).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
from torch.utils.weak import WeakIdKeyDictionary

from .manager import Analysis
from .ops import ELEMENTWISE_KINDS, NORM_KINDS, POOL_KINDS, op_kind, op_name
from .shapes import ShapeAnalysis, ShapeMap, TensorSpec
from ..sparsity.init import exact_count
from ..sparsity.layers import MaskedLayer

CATEGORIES = ("weight", "attention", "norm", "pool", "elementwise", "embedding", "other")


@dataclass(frozen=True)
class NodeFlops:
    """FLOPs of one node (per sample). ``numel``/``nnz`` are set for weight layers only."""

    node: str
    target: str
    kind: str
    category: str
    dense: float
    effective: float
    numel: int = 0
    nnz: int = 0


@dataclass(frozen=True)
class FlopCounts:
    """Per-node FLOPs of a graph, and totals by category."""

    nodes: Dict[str, NodeFlops]
    batch: int
    uncounted: Tuple[str, ...] = ()

    def total(self, category: Optional[str] = None, effective: bool = True) -> float:
        return sum((n.effective if effective else n.dense) for n in self.nodes.values()
                   if category is None or n.category == category)

    @property
    def weight_dense(self) -> float:
        return self.total("weight", effective=False)

    @property
    def weight_effective(self) -> float:
        return self.total("weight", effective=True)

    def by_category(self, effective: bool = True) -> Dict[str, float]:
        return {c: self.total(c, effective) for c in CATEGORIES}


_NNZ_CACHE = WeakIdKeyDictionary()  # mask tensor -> (version, non-zeros)


def mask_nnz(mask: torch.Tensor) -> int:
    """Non-zeros of a mask, cached until the tensor is modified in place (its version changes)."""
    cached = _NNZ_CACHE.get(mask)
    if cached is not None and cached[0] == mask._version:
        return cached[1]
    count = int(torch.count_nonzero(mask))
    _NNZ_CACHE[mask] = (mask._version, count)
    return count


def planned_nnz(layer: MaskedLayer) -> int:
    """The non-zeros of a masked layer's mask: counted, or on the meta device (nothing drawn, a
    compile that only plans) the exact count its target density will draw."""
    if layer.weight_mask.is_meta:
        return exact_count(layer.target_density, layer.weight.numel()) if layer.target_density < 1 \
            else layer.weight.numel()
    return mask_nnz(layer.weight_mask)


def _numel(spec) -> int:
    return spec.numel if isinstance(spec, TensorSpec) else 0


def _weight_layer(gm, node, shapes: ShapeMap, module) -> Tuple[float, float, int, int]:
    out = shapes[node]
    if out is None:
        return 0.0, 0.0, 0, 0
    weight = module.weight
    numel = weight.numel()
    nnz = planned_nnz(module) if isinstance(module, MaskedLayer) else numel
    if isinstance(module, torch.nn.Linear):
        positions = out.numel // max(module.out_features, 1)
    elif getattr(module, "transposed", False):
        inp = shapes[node.args[0]]
        positions = _numel(inp) // max(module.in_channels, 1)
    else:
        positions = out.numel // max(module.out_channels, 1)
    return 2.0 * positions * numel, 2.0 * positions * nnz, numel, nnz


def _functional_weight(node, shapes: ShapeMap, kind: str) -> float:
    out, weight = shapes[node], None
    args = [a for a in node.args if isinstance(a, fx.Node)]
    if kind == "linear" and len(args) >= 2:
        weight = shapes[args[1]]
        return 2.0 * _numel(out) * (weight.shape[-1] if weight else 0)
    if kind == "conv" and len(args) >= 2:
        weight = shapes[args[1]]
        if weight and out:
            return 2.0 * (out.numel // out.shape[1]) * weight.numel
    return 0.0


def _matmul(node, shapes: ShapeMap, kind: str) -> float:
    out = shapes[node]
    operands = [a for a in node.args if isinstance(a, fx.Node)]
    name = op_name(node)
    if name in ("addmm", "baddbmm") and len(operands) >= 3:
        operands = operands[1:]
    first = shapes[operands[0]] if operands else None
    if out is None or first is None:
        return 0.0
    return 2.0 * out.numel * first.shape[-1]


def _sdpa(node, shapes: ShapeMap) -> float:
    q, k, v = (shapes[a] if isinstance(a, fx.Node) else None for a in node.args[:3])
    if not (q and k and v):
        return 0.0
    heads = math.prod(q.shape[:-2])
    length, source = q.shape[-2], k.shape[-2]
    return heads * (2.0 * length * source * (q.shape[-1] + v.shape[-1]) + 3.0 * length * source)


def _pool(gm, node, shapes: ShapeMap) -> float:
    out = shapes[node]
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        kernel = getattr(module, "kernel_size", None)
        if kernel is not None and out is not None:
            kernel = kernel if isinstance(kernel, tuple) else (kernel,) * (len(out.shape) - 2)
            return float(out.numel * math.prod(kernel))
    inp = shapes[node.args[0]] if node.args and isinstance(node.args[0], fx.Node) else None
    return float(_numel(inp))


def count_flops(gm: fx.GraphModule, shapes: ShapeMap, batch: int) -> FlopCounts:
    """FLOPs of every node of ``gm`` (see the module docstring for the conventions)."""
    nodes: Dict[str, NodeFlops] = {}
    uncounted: List[str] = []
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        kind = op_kind(gm, node)
        out = shapes[node]
        floating = out is not None and out.dtype.is_floating_point
        numel = nnz = 0
        if kind in ("linear", "conv", "conv_transpose") and node.op == "call_module":
            dense, effective, numel, nnz = _weight_layer(gm, node, shapes, gm.get_submodule(str(node.target)))
            category = "weight"
        elif kind in ("linear", "conv"):
            dense = effective = _functional_weight(node, shapes, kind)
            category = "weight"
        elif kind == "matmul":
            operands = [a for a in node.args if isinstance(a, fx.Node)]
            category = "weight" if any(a.op == "get_attr" for a in operands) else "attention"
            dense = effective = _matmul(node, shapes, kind)
        elif kind == "sdpa":
            dense = effective = _sdpa(node, shapes)
            category = "attention"
        elif kind in NORM_KINDS:
            dense = effective = (2.0 if kind == "batch_norm" else 5.0) * _numel(out)
            category = "norm"
        elif kind in POOL_KINDS:
            dense = effective = _pool(gm, node, shapes) if floating else 0.0
            category = "pool"
        elif kind in ELEMENTWISE_KINDS or kind == "softmax":
            dense = effective = (3.0 if kind == "softmax" else 1.0) * _numel(out) if floating else 0.0
            category = "elementwise"
        elif kind == "embedding":
            dense = effective = 0.0
            category = "embedding"
        else:
            dense = effective = 0.0
            category = "other"
            if kind is None and floating and not node.op == "call_method":
                uncounted.append(op_name(node))
            elif kind is None and floating and node.op == "call_method":
                uncounted.append(f"Tensor.{node.target}")
        nodes[node.name] = NodeFlops(node.name, str(node.target) if node.op == "call_module" else op_name(node),
                                     kind or op_name(node), category, dense / batch, effective / batch, numel, nnz)
    return FlopCounts(nodes, batch, tuple(sorted(set(uncounted))))


class FlopAnalysis(Analysis[FlopCounts]):
    name = "flops"

    @classmethod
    def run(cls, unit) -> FlopCounts:
        shapes = unit.analyses.get(ShapeAnalysis)
        return count_flops(unit.module, shapes, unit.batch_size)
