"""ChannelCouplingAnalysis: which tensor dimensions must keep the same size (for Sparse Wide).

Torch-Pruning's DepGraph used the other way round. Every axis of every value gets an axis
expression (`analyses.axes`); each op's rule unifies the axes it couples:

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
from .axes import AxisGraph, Const, Expr
from .manager import Analysis
from .ops import op_kind, op_name
from .shapes import ShapeAnalysis, ShapeMap, TensorSpec


@dataclass(frozen=True)
class SizeValue:
    """An int (or tuple of ints) read from tensor shapes: ``expr`` when it is exactly one axis,
    None when it was computed (then ``sources`` lists the axes it depends on)."""

    exprs: Tuple[Optional[Expr], ...]
    sources: Tuple[Expr, ...] = ()
    single: bool = True


@dataclass
class Literal:
    """A constant size argument of a node that must follow an axis: node.args[index][slot]."""

    node: str
    index: int
    slot: Optional[int]
    expr: Expr
    value: int


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


COMPARISONS = {"eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_not",
               "__and__", "__or__", "bitwise_and", "bitwise_or", "isnan", "isinf"}
PASSTHROUGH = {"identity", "dropout", "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish",
               "hardsigmoid", "mish", "leaky_relu", "elu", "softmax", "neg", "abs", "sqrt", "exp", "log",
               "assert", "contiguous", "clamp", "erf", "type_as"}
_CLAMPS = {"clamp", "clamp_min", "clamp_max", "clip", "erf", "masked_fill", "where", "lerp", "float", "half",
           "bfloat16", "to", "_to_copy", "copy", "triu", "tril", "round", "floor", "ceil", "sign",
           "reciprocal", "square", "cos", "sin", "log1p", "softplus", "dropout_", "rsub", "maximum", "minimum"}


class _Builder:
    def __init__(self, gm: fx.GraphModule, shapes: ShapeMap, attention_width: str) -> None:
        self.gm, self.shapes, self.attention_width = gm, shapes, attention_width
        self.axes = AxisGraph()
        self.result = CouplingResult(self.axes, {}, {}, {})
        self._param_ids: Dict[int, Tuple[Expr, ...]] = {}

    # -- helpers -------------------------------------------------------------------------
    def fresh(self, spec: Optional[TensorSpec], label: str, pinned: Optional[str] = None) -> Tuple[Expr, ...]:
        if spec is None:
            return ()
        return tuple(self.axes.new(d, f"{label}[{i}]", pinned) for i, d in enumerate(spec.shape))

    def axes_of(self, arg: Any) -> Optional[Tuple[Expr, ...]]:
        value = self.result.values.get(arg.name) if isinstance(arg, fx.Node) else None
        return value if isinstance(value, tuple) and all(not isinstance(v, tuple) for v in value) else None

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
        return _fresh_tree(self, spec, node.name, reason)

    # -- the walk ------------------------------------------------------------------------
    def run(self) -> CouplingResult:
        for node in self.gm.graph.nodes:
            self.result.values[node.name] = self.visit(node)
        return self.result

    def visit(self, node: fx.Node) -> Any:
        spec = self.shapes[node]
        if node.op == "placeholder":
            return _fresh_tree(self, self.shapes.value(node), node.name, "model input")
        if node.op == "output":
            for value in _flatten_nodes(node.args[0]):
                for expr in _flatten(self.result.values.get(value.name)):
                    self.axes.pin(expr, "model output")
            return None
        if node.op == "get_attr":
            return self.param(node)
        if node.op == "call_module":
            return self.module(node)
        if spec is not None and not spec.dtype.is_floating_point and not self._keeps_axes(node):
            return _fresh_tree(self, self.shapes.value(node), node.name, "integer tensor")
        return self.function(node)

    def _keeps_axes(self, node: fx.Node) -> bool:
        return op_name(node) in COMPARISONS

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

    # -- modules ---------------------------------------------------------------------------
    def module_axes(self, path: str, make) -> Dict[str, Any]:
        if path not in self.result.modules:
            self.result.modules[path] = make()
        return self.result.modules[path]

    def module(self, node: fx.Node) -> Any:
        path = str(node.target)
        module = self.gm.get_submodule(path)
        kind = op_kind(self.gm, node)
        x = self.axes_of(node.args[0]) if node.args else None
        if x is None:
            return self.opaque(node, f"module {type(module).__name__} with a non-tensor input")
        new = self.axes.new
        if kind == "linear":
            m = self.module_axes(path, lambda: {"in": new(module.in_features, f"{path}.in"),
                                                "out": new(module.out_features, f"{path}.out")})
            self.axes.unify(x[-1], m["in"], path)
            return x[:-1] + (m["out"],)
        if kind == "conv":
            def make():
                cin = new(module.in_channels, f"{path}.in")
                depthwise = module.groups == module.in_channels == module.out_channels and module.groups > 1
                cout = cin if depthwise else new(module.out_channels, f"{path}.out")
                if module.groups > 1 and not depthwise:
                    self.axes.require_multiple(cin, module.groups)
                    self.axes.require_multiple(cout, module.groups)
                return {"in": cin, "out": cout, "depthwise": depthwise}
            m = self.module_axes(path, make)
            channel = len(x) - len(module.kernel_size) - 1
            self.axes.unify(x[channel], m["in"], path)
            out = self.shapes[node]
            spatial = tuple(self.axes.new(d, f"{path}.spatial", "spatial size") for d in out.shape[channel + 1:])
            return x[:channel] + (m["out"],) + spatial
        if kind == "batch_norm" or kind == "instance_norm":
            m = self.module_axes(path, lambda: {"features": new(module.num_features, f"{path}.features")})
            self.axes.unify(x[1], m["features"], path)
            return x
        if kind == "group_norm":
            m = self.module_axes(path, lambda: {"features": new(module.num_channels, f"{path}.features")})
            self.axes.require_multiple(m["features"], module.num_groups)
            self.axes.unify(x[1], m["features"], path)
            return x
        if kind in ("layer_norm", "rms_norm"):
            shape = tuple(module.normalized_shape)
            m = self.module_axes(path, lambda: {"shape": tuple(new(d, f"{path}.shape") for d in shape)})
            for a, b in zip(x[-len(shape):], m["shape"]):
                self.axes.unify(a, b, path)
            return x
        if kind == "embedding":
            m = self.module_axes(path, lambda: {"dim": new(module.embedding_dim, f"{path}.dim")})
            self._tie(module.weight, (Const(module.num_embeddings), m["dim"]), path)
            return x + (m["dim"],)
        if kind in PASSTHROUGH:
            return x
        if kind in ("max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool"):
            return self.pool(node, x)
        if kind == "flatten":
            from .coupling_rules import view_axes
            return view_axes(self, node, x, None)
        return self.opaque(node, f"module {type(module).__name__} has no coupling rule")

    def _tie(self, weight: torch.Tensor, axes: Tuple[Expr, ...], where: str) -> None:
        """A Parameter shared by two modules (tied embedding / LM head) couples their axes."""
        previous = self._param_ids.setdefault(id(weight), axes)
        if previous is not axes:
            for a, b in zip(previous, axes):
                self.axes.unify(a, b, where)

    def pool(self, node: fx.Node, x: Tuple[Expr, ...]) -> Tuple[Expr, ...]:
        out = self.shapes[node]
        keep = 2 if len(x) >= 3 else 1
        return x[:keep] + tuple(self.axes.new(d, f"{node.name}.spatial", "spatial size") for d in out.shape[keep:])

    # -- functions -------------------------------------------------------------------------
    def function(self, node: fx.Node) -> Any:
        from . import coupling_rules
        return coupling_rules.apply(self, node)


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


def _fresh_tree(builder: _Builder, spec: Any, label: str, pinned: Optional[str]) -> Any:
    if isinstance(spec, TensorSpec):
        return builder.fresh(spec, label, pinned)
    if isinstance(spec, (tuple, list)):
        return tuple(_fresh_tree(builder, s, label, pinned) for s in spec)
    return None


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
