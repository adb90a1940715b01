"""ChannelCouplingAnalysis: which tensor dimensions must keep the same size (for Sparse Wide).

Torch-Pruning's DepGraph used the other way round. Every axis of every value gets an axis
expression (`analyses.axes`); the coupling rule of each op (its row in `ops`) unifies the axes it
couples:

==================  =================================================================
Linear              input[-1] = in_features; output[-1] = out_features
Conv                input[1] = in_channels (depthwise: = out_channels); spatial fixed
BatchNorm/GroupNorm input[1] = num_features (GroupNorm: multiple of the groups)
LayerNorm           input[-n:] = normalized_shape
Embedding           output[-1] = embedding_dim (the vocabulary stays)
add/mul/where/...   broadcast: equal axes of size > 1 are unified
cat / split         the axis is the Sum of the parts (split sizes become literals to rewrite)
view / flatten      axes are matched by size products: merges are Prod, splits define a Prod
                    of new axes (the leading ones, e.g. heads, are pinned)
sdpa / matmul       q k contract head_dim; with attention_width="keep" head_dim is pinned
==================  =================================================================

Model inputs and outputs are pinned (image channels, token ids, classes, vocabulary). Integer
tensors (masks, positions) never carry channels. An op without a rule pins every axis it touches
and is named in ``notes``: a group it touches keeps its width rather than risking a wrong model.
Literal sizes in the graph (``view(B, L, 12, 64)``, ``split(768)``) are recorded so the Sparse
Wide pass can rewrite them; sizes read from tensors (``x.shape[-1]``) couple the axes they read.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import describe_node
from .axes import AxisGraph, Expr, FloorDiv, Sym, symbols
from .coupling_rules import Literal, SizeLink, SizeValue, reads_sizes, size_math
from .manager import Analysis
from .ops import lookup, op_name
from .shapes import ShapeAnalysis, ShapeMap, TensorSpec, internal_outputs

__all__ = ["ChannelCouplingAnalysis", "CouplingResult", "Literal", "SizeValue", "analyze_coupling", "getattr_path"]


@dataclass
class CouplingResult:
    """The solved-for data of the analysis; `AxisGraph` holds the groups."""

    axes: AxisGraph
    values: Dict[str, Any]                         # node name -> tuple of Expr (or tuples / SizeValue)
    modules: Dict[str, Dict[str, Any]]             # module path -> {"in": Expr, "out": Expr, ...}
    params: Dict[str, Tuple[Expr, ...]]            # get_attr target -> axes of the tensor
    literals: List[Literal] = field(default_factory=list)
    sdpa_scales: List[Tuple[str, Expr]] = field(default_factory=list)  # (node, head_dim) for scale=
    notes: List[str] = field(default_factory=list)



class _Builder:
    def __init__(self, gm: fx.GraphModule, shapes: ShapeMap, attention_width: str) -> None:
        self.gm, self.shapes, self.attention_width = gm, shapes, attention_width
        self.axes = AxisGraph()
        self.result = CouplingResult(self.axes, {}, {}, {})
        self._param_ids: Dict[int, Tuple[Expr, ...]] = {}
        self.links: List[SizeLink] = []
        self.slices: List[Tuple[Expr, Expr, str]] = []  # (sliced axis, the part taken, reason)

    # -- helpers -------------------------------------------------------------------------
    def fresh(self, spec: Optional[TensorSpec], label: str, pinned: Optional[str] = None) -> Tuple[Expr, ...]:
        if spec is None:
            return ()
        return tuple(self.axes.new(d, f"{label}[{i}]", pinned) for i, d in enumerate(spec.shape))

    def axes_of(self, arg: Any) -> Optional[Tuple[Expr, ...]]:
        value = self.result.values.get(arg.name) if isinstance(arg, fx.Node) else None
        return value if isinstance(value, tuple) and all(not isinstance(v, tuple) for v in value) else None

    def sliced(self, axis: Expr, part: Expr, node: fx.Node) -> None:
        """``part`` is a part of ``axis`` (a slice): the axis keeps its width (`settle_slices`)."""
        self.slices.append((axis, part, f"partly sliced at {node.name}"))

    def settle_slices(self) -> None:
        """Pin each sliced axis. When every part taken of it was kept because the user asked
        (Phi-3's fused qkv sliced into q, k, v; partial rotary's head dim: each part's heads x head_dim
        kept by attention_width="keep"), that is the reason given; else the slice is."""
        parts: Dict[int, List[Expr]] = {}
        for axis, part, _ in self.slices:
            for sym in symbols(axis):
                parts.setdefault(self.axes.root(sym), []).append(part)
        pending = list(self.slices)
        while True:  # a part may itself be sliced later on (q's head dim, by partial rotary): to a fixed point
            left = []
            for axis, part, reason in pending:
                asked = [self._asked_reason(p) for sym in symbols(axis) for p in parts[self.axes.root(sym)]]
                if asked and all(asked):
                    self.axes.pin(axis, asked[0], asked=True)
                else:
                    left.append((axis, part, reason))
            if len(left) == len(pending):
                break
            pending = left
        for axis, _, reason in pending:
            self.axes.pin(axis, reason)
        for axis, part, _ in self.slices:  # a part of a width kept as asked is kept as asked (DeepSeek's k_nope)
            kept = self._asked_reason(axis)
            if kept:
                self.axes.pin(part, kept, asked=True)

    def _asked_reason(self, expr: Expr) -> Optional[str]:
        """Why ``expr`` keeps its size when the user asked for it (itself or, for a size defined
        by others such as heads x head_dim, every part of it), else None."""
        reasons = []
        for sym in symbols(expr):
            root = self.axes.root(sym)
            if root in self.axes.asked:
                reasons.append(self.axes.pinned[root])
            elif root in self.axes.definition:
                reasons.append(self._asked_reason(self.axes.definition[root]))
            else:
                return None
        return reasons[0] if reasons and all(reasons) else None

    def pin_inputs(self, node: fx.Node, reason: str) -> None:
        for arg in node.all_input_nodes:
            value = self.result.values.get(arg.name)
            for expr in _flatten(value):
                self.axes.pin(expr, reason)

    def opaque(self, node: fx.Node, why: str) -> Any:
        """No rule: pin every axis in and out, and say so."""
        reason = f"{why} at {describe_node(node)}"
        self.pin_inputs(node, reason)
        spec = self.shapes.value(node)
        if isinstance(spec, TensorSpec) and spec.dtype.is_floating_point:
            self.result.notes.append(f"kept at width: {reason}")
        return self.fresh_tree(spec, node.name, reason)

    def fresh_tree(self, spec: Any, label: str, pinned: Optional[str]) -> Any:
        if isinstance(spec, TensorSpec):
            return self.fresh(spec, label, pinned)
        if isinstance(spec, (tuple, list)):
            return tuple(self.fresh_tree(s, label, pinned) for s in spec)
        return None

    # -- the walk ------------------------------------------------------------------------
    def run(self) -> CouplingResult:
        for node in self.gm.graph.nodes:
            self.result.values[node.name] = self.visit(node)
        self.settle_slices()
        while self.axes.propagate_pins():
            pass
        for link in self.links:
            settle(self.axes, link, self.result.literals)
        return self.result

    def visit(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            value = self.fresh_tree(self.shapes.value(node), node.name, "model input")
            for expr in _flatten(value):
                self.axes.mark_varying(expr)
            return value
        if node.op == "output":
            internal = internal_outputs(self.gm)
            for value in _flatten_nodes(node.args[0]):
                if value.name in internal:  # an encoder-decoder's encoder states: d_model, widened
                    continue
                for expr in _flatten(self.result.values.get(value.name)):
                    self.axes.pin(expr, "model output")
            return None
        if node.op == "get_attr":
            return self.param(node)
        spec, value = lookup(self.gm, node), self.shapes.value(node)
        if node.op != "call_module":
            if isinstance(value, TensorSpec) and not value.dtype.is_floating_point \
                    and (spec is None or spec.kind != "compare"):
                return self.fresh_tree(value, node.name, "integer tensor")
            if (spec is None or spec.kind not in ("size", "getitem")) \
                    and (not isinstance(value, (TensorSpec, tuple, list)) or reads_sizes(self, node)):
                return size_math(self, node)  # ints computed from shapes
        if spec is None or spec.coupling is None:
            what = f"module {type(self.gm.get_submodule(str(node.target))).__name__}" if node.op == "call_module" \
                else op_name(node)
            return self.opaque(node, f"no coupling rule for {what}")
        return spec.coupling(self, node)

    def param(self, node: fx.Node) -> Any:
        value = getattr_path(self.gm, str(node.target))
        if not isinstance(value, torch.Tensor):
            return None
        if id(value) in self._param_ids:
            axes = self._param_ids[id(value)]
        else:
            pinned = None if value.is_floating_point() else "integer buffer"
            axes = tuple(self.axes.new(d, f"{node.target}[{i}]", pinned) for i, d in enumerate(value.shape))
            self._param_ids[id(value)] = axes
        self.result.params[str(node.target)] = axes
        return axes

    def module_axes(self, path: str, make) -> Dict[str, Any]:
        if path not in self.result.modules:
            self.result.modules[path] = make()
        return self.result.modules[path]

    def tie(self, weight: torch.Tensor, axes: Tuple[Expr, ...], where: str) -> None:
        """A Parameter shared by two modules (tied embedding / LM head) couples their axes."""
        previous = self._param_ids.setdefault(id(weight), axes)
        if previous is not axes:
            for a, b in zip(previous, axes):
                self.axes.unify(a, b, where)


def settle(axes: AxisGraph, link: SizeLink, literals: List[Literal]) -> None:
    """A size argument computed by a node (``view(B, T, n_head, C // n_head)``) and the axis it
    gives. Where both can change, they are unified, as the code says (``C // n_head`` stays exact:
    C becomes a multiple of n_head). Where the axis is kept (attention_width="keep") or unifying
    would define a size in terms of itself, the argument becomes a literal Sparse Wide rewrites
    when the node no longer computes the axis' size. Sizes that follow the input shape (batch,
    sequence) are never written as literals: those are unified (and pinned) as before."""
    size, where = link.size, link.node
    expr = size.exprs[0] if size.single else None
    value = axes.original(link.axis)
    if expr is None:  # computed outside the algebra: rewrite if anything it reads changes
        if size.sources and not axes.varies(size.sources):
            literals.append(Literal(link.node, link.index, link.slot, link.axis, value, computed=size.sources))
        else:
            axes.pin(link.axis, f"size computed from other axes at {where}")
            for source in size.sources:
                axes.pin(source, f"size computed from other axes at {where}")
        return
    if axes.fixed(link.axis) and axes.fixed(expr):
        return
    if not axes.varies([expr]) and (axes.fixed(link.axis) or not _can_unify(axes, link.axis, expr)):
        literals.append(Literal(link.node, link.index, link.slot, link.axis, value, source=expr))
        return
    axes.unify(link.axis, expr, where)
    for part in _floor_divs(expr):
        axes.require_multiple(part.numerator, part.divisor)


def _can_unify(axes: AxisGraph, a: Expr, b: Expr) -> bool:
    """Unifying binds a free symbol to the other side without defining it in terms of itself."""
    def binds(sym: Expr, other: Expr) -> bool:
        return isinstance(sym, Sym) and axes.root(sym) not in axes.definition \
            and axes.root(sym) not in axes.reach(other)
    return binds(a, b) or binds(b, a)


def _floor_divs(expr: Expr) -> List[FloorDiv]:
    found = [expr] if isinstance(expr, FloorDiv) else []
    for part in getattr(expr, "terms", ()) + getattr(expr, "factors", ()) + \
            ((expr.numerator,) if isinstance(expr, FloorDiv) else ()):
        found.extend(_floor_divs(part))
    return found


def _flatten(value: Any) -> List[Expr]:
    if value is None or isinstance(value, SizeValue):
        return []
    if isinstance(value, tuple):
        out: List[Expr] = []
        for v in value:
            out.extend(_flatten(v) if isinstance(v, tuple) else [v])
        return out
    return []


def _flatten_nodes(arg: Any) -> List[fx.Node]:
    found: List[fx.Node] = []
    fx.map_arg(arg, lambda n: found.append(n))
    return found


def getattr_path(root: nn.Module, target: str) -> Any:
    """``root.a.b.c`` for target "a.b.c" (a get_attr node's target)."""
    return operator.attrgetter(target)(root)


def analyze_coupling(gm: fx.GraphModule, shapes: ShapeMap, attention_width: str = "keep") -> CouplingResult:
    """Build the axis groups of ``gm`` (see the module docstring)."""
    return _Builder(gm, shapes, attention_width).run()


class ChannelCouplingAnalysis(Analysis[CouplingResult]):
    name = "coupling"

    @classmethod
    def run(cls, unit) -> CouplingResult:
        return analyze_coupling(unit.module, unit.analyses.get(ShapeAnalysis), unit.config.attention_width)
