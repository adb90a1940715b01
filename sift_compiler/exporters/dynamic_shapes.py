"""Dynamic batch and sequence axes for graphs captured by torch.export, through the TorchScript exporter.

A torch.export graph reads sizes with ``aten.sym_size.int`` and hands them to aten overloads
(``aten.view.default(x, [b, s, -1, 64])``). The TorchScript tracer records a size as a graph value
only when it flows into a torch-level call (``Tensor.view``, ``torch.arange``, indexing); an aten
overload receives a plain number, and the ONNX file holds it as a constant: a file declared with a
dynamic batch that only runs at the example's shape. `make_sizes_traceable` rewrites the graph so
that every size reaches the tracer:

- ``aten.sym_size.int(x, d)`` becomes ``x.size(d)``;
- the aten calls that consume sizes become their torch-level equivalents (view, reshape, expand,
  slicing, arange);
- two ops that exported only because their inputs were constants get compositions that export for
  any input: ``aten.diff`` (no ONNX symbolic) and ``aten.cumsum`` of a bool or integer tensor
  (ONNX CumSum takes no bool: the input is cast to int64, which is what torch returns).

A size consumer outside that table raises `UnsupportedSizeUse`, and the exporter writes the file
with the example's fixed shapes and a note naming the op. The exporter also proves the result:
it runs the file at a second input shape against torch (`other_shape_inputs`).
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Dict, Optional, Set

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

aten = torch.ops.aten


class UnsupportedSizeUse(Exception):
    """A graph passes a symbolic size to an op the rewrite does not know."""

    def __init__(self, node: fx.Node) -> None:
        super().__init__(f"{node.target} (node {node.name!r})")
        self.node = node


def has_symbolic_sizes(module: nn.Module) -> bool:
    """Whether ``module`` is a graph that reads sizes with ``aten.sym_size`` (torch.export captures)."""
    return isinstance(module, fx.GraphModule) and any(
        n.op == "call_function" and n.target is aten.sym_size.int for n in module.graph.nodes)


def _slice(x: torch.Tensor, dim: int = 0, start: Optional[Any] = None, end: Optional[Any] = None,
           step: int = 1) -> torch.Tensor:
    """``aten.slice.Tensor`` as indexing, which the tracer records with traced bounds."""
    return x[(slice(None),) * (dim % x.dim()) + (slice(start, end, step),)]


def _arange(*args, dtype=None, layout=None, device=None, pin_memory=None) -> torch.Tensor:
    """``aten.arange.*`` as ``torch.arange`` (layout and pinning are irrelevant to the export)."""
    return torch.arange(*args, dtype=dtype, device=device)


def _diff(x: torch.Tensor, n: int = 1, dim: int = -1, prepend: Optional[torch.Tensor] = None,
          append: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``torch.diff`` from concatenation, slicing and subtraction, which all have ONNX forms."""
    parts = [t for t in (prepend, x, append) if t is not None]
    x = torch.cat(parts, dim) if len(parts) > 1 else x
    head = (slice(None),) * (dim % x.dim())
    for _ in range(n):
        x = x[head + (slice(1, None),)] - x[head + (slice(None, -1),)]
    return x


def _cumsum(x: torch.Tensor, dim: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``torch.cumsum`` with torch's int64 result made explicit, so ONNX CumSum never sees a bool."""
    if dtype is None and not (x.is_floating_point() or x.is_complex()):
        dtype = torch.int64
    return torch.cumsum(x, dim, dtype=dtype)


def _method(name: str) -> Callable[[fx.Graph, fx.Node], fx.Node]:
    def emit(graph: fx.Graph, node: fx.Node) -> fx.Node:
        return graph.call_method(name, node.args[:2])  # (tensor, sizes); aten's extra flags are autograd's
    return emit


def _function(fn: Callable) -> Callable[[fx.Graph, fx.Node], fx.Node]:
    def emit(graph: fx.Graph, node: fx.Node) -> fx.Node:
        return graph.call_function(fn, node.args, dict(node.kwargs))
    return emit


# aten overloads that take sizes -> the torch-level call the tracer records sizes through
SIZE_CONSUMERS: Dict[Any, Callable[[fx.Graph, fx.Node], fx.Node]] = {
    aten.view.default: _method("view"),
    aten.reshape.default: _method("reshape"),
    aten.expand.default: _method("expand"),
    aten.slice.Tensor: _function(_slice),
    aten.arange.default: _function(_arange),
    aten.arange.start: _function(_arange),
    aten.arange.start_step: _function(_arange),
}
# ops that exported only from constant inputs -> compositions that export for any input
CONSTANT_ONLY_OPS: Dict[Any, Callable] = {aten.diff.default: _diff, aten.cumsum.default: _cumsum}


def _size_nodes(graph: fx.Graph) -> Set[fx.Node]:
    """sym_size nodes and the Python arithmetic computed from them."""
    sizes: Set[fx.Node] = set()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is aten.sym_size.int or (
                getattr(node.target, "__module__", None) in ("_operator", "operator")
                and node.target is not operator.getitem and any(a in sizes for a in node.all_input_nodes)):
            sizes.add(node)
    return sizes


def make_sizes_traceable(module: fx.GraphModule) -> int:
    """Rewrite ``module`` in place (see the module docstring); returns how many nodes changed.

    Raises `UnsupportedSizeUse` before changing anything when a size reaches an op outside
    `SIZE_CONSUMERS`.
    """
    graph = module.graph
    sizes = _size_nodes(graph)
    consumers = {n for n in graph.nodes
                 if n not in sizes and n.op == "call_function" and any(a in sizes for a in n.all_input_nodes)}
    unsupported = [n for n in graph.nodes if n in consumers and n.target not in SIZE_CONSUMERS]
    if unsupported:
        raise UnsupportedSizeUse(unsupported[0])
    changed = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        with graph.inserting_before(node):
            if node.target is aten.sym_size.int:
                new = graph.call_method("size", node.args)
            elif node in consumers:
                new = SIZE_CONSUMERS[node.target](graph, node)
            elif node.target in CONSTANT_ONLY_OPS:
                new = graph.call_function(CONSTANT_ONLY_OPS[node.target], node.args, dict(node.kwargs))
            else:
                continue
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        changed += 1
    graph.lint()
    module.recompile()
    return changed


def other_shape_inputs(tree: Any, halve_length: bool = False) -> Any:
    """The example inputs at another shape along the axes the exporter declares dynamic.

    Every tensor with a batch axis gets one more sample (a copy of its first); integer (token id)
    matrices of length >= 3 also lose their last position, or with ``halve_length`` half of their
    positions (at least 2 stay: as many tokens as the example for a batch of one, so a check run
    at the second size costs what one at the example costs). A file that baked a size in fails on these.
    """
    def resize(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return x
        x = torch.cat([x, x[:1]])
        if x.dim() == 2 and not x.is_floating_point() and x.shape[1] >= 3:
            x = x[:, :max(2, x.shape[1] // 2)] if halve_length else x[:, :-1]
        return x
    return pytree.tree_map(resize, tree)
