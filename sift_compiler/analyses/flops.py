"""FlopAnalysis: forward FLOPs per sample of every node, dense and effective (non-zero weights only).

Each node is costed by the FLOP rule of its row in the op table (`ops`; the conventions are in
`flop_rules` and docs/architecture.md). A node whose op has no rule costs 0 and is listed in
``uncounted``: never silently skipped. A node inside a mixture-of-experts' experts costs
``top_k / num_experts`` of that (``node.meta["sift.routed"]``, `capture.experts`): the graph runs
every expert on every token, a token visits top_k of them, so FLOPs are counted per token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch.fx as fx
import torch.utils._pytree as pytree

from ..capture.experts import ROUTED
from ..sparsity.layers import mask_nnz  # noqa: F401  (re-exported: verify reads it here)
from .flop_rules import Cost
from .manager import Analysis
from .ops import lookup, op_name
from .shapes import ShapeAnalysis, ShapeMap, TensorSpec

__all__ = ["CATEGORIES", "FlopAnalysis", "FlopCounts", "NodeFlops", "count_flops", "mask_nnz", "routed_shares"]
CATEGORIES = ("weight", "attention", "norm", "pool", "elementwise", "embedding", "other")
_CALLS = ("call_module", "call_function", "call_method")


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


def _floating(value) -> bool:
    return any(isinstance(v, TensorSpec) and v.dtype.is_floating_point for v in pytree.tree_leaves(value))


def count_flops(gm: fx.GraphModule, shapes: ShapeMap, batch: int) -> FlopCounts:
    """FLOPs of every node of ``gm`` (see the module docstring)."""
    nodes: Dict[str, NodeFlops] = {}
    uncounted: List[str] = []
    for node in gm.graph.nodes:
        if node.op not in _CALLS:
            continue
        spec = lookup(gm, node)
        if spec is None or spec.flops is None:
            cost = Cost("other", 0.0)
            if _floating(shapes.value(node)):
                uncounted.append(op_name(node))
        else:
            cost = spec.flops(gm, node, shapes)
        effective = cost.dense if cost.effective is None else cost.effective
        routed = node.meta.get(ROUTED, 1.0)  # an expert's layers see top_k / num_experts of the tokens
        effective, dense = effective * routed, cost.dense * routed
        target = str(node.target) if node.op == "call_module" else op_name(node)
        nodes[node.name] = NodeFlops(node.name, target, spec.kind if spec else op_name(node), cost.category,
                                     dense / batch, effective / batch, cost.numel, cost.nnz)
    return FlopCounts(nodes, batch, tuple(sorted(set(uncounted))))


def routed_shares(gm: fx.GraphModule) -> Dict[str, float]:
    """{module path: the fraction of tokens that use it} for the modules inside a mixture of experts'
    experts (``sift.routed``), what `sparsity.count_parameters` counts their active parameters at."""
    return {str(n.target): n.meta[ROUTED] for n in gm.graph.nodes if n.op == "call_module" and ROUTED in n.meta}


class FlopAnalysis(Analysis[FlopCounts]):
    name = "flops"

    @classmethod
    def run(cls, unit) -> FlopCounts:
        shapes = unit.analyses.get(ShapeAnalysis)
        return count_flops(unit.module, shapes, unit.batch_size)
