"""FLOP rules of the op table (`ops`): forward FLOPs of one node, per batch.

Conventions (also in docs/architecture.md): FLOPs = 2 x multiply-accumulates. A weight layer
costs ``2 x positions x nnz(W)`` where positions is the number of output vectors (tokens, or
output pixels of a conv; grouped and depthwise convs included) and nnz counts only unmasked
weights; the dense count uses numel(W). Matmuls, einsum and sdpa count ``2 M N K`` (a matmul or
einsum with a parameter operand is a weight layer, one of two activations is attention). BatchNorm
counts 2 per element (inference scale and shift), other norms 5, pooling and reductions one per
input element read, element-wise ops one per output element (softmax 3). Bias adds are not
counted. `FREE` ops (views, copies, embedding lookups, size arithmetic) cost 0 on purpose; an op
without a rule is listed in the report's ``uncounted``, never silently taken as free.

A rule is ``rule(gm, node, shapes) -> Cost``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch.fx as fx
import torch.nn as nn

from ..sparsity.counts import planned_nnz
from ..sparsity.layers import MaskedLayer
from .shapes import ShapeMap, TensorSpec


@dataclass(frozen=True)
class Cost:
    """FLOPs of one node per batch; ``numel``/``nnz`` are set for weight layers only."""

    category: str
    dense: float
    effective: Optional[float] = None  # None: same as dense
    numel: int = 0
    nnz: int = 0


FlopRule = Callable[[fx.GraphModule, fx.Node, ShapeMap], Cost]


def _numel(spec) -> int:
    return spec.numel if isinstance(spec, TensorSpec) else 0


def _floating(spec) -> bool:
    return isinstance(spec, TensorSpec) and spec.dtype.is_floating_point


def _operands(node: fx.Node) -> List[fx.Node]:
    return [a for a in node.args if isinstance(a, fx.Node)]


def free(category: str = "other") -> FlopRule:
    """An op that costs nothing by convention (views, copies, lookups)."""
    cost = Cost(category, 0.0)

    def rule(gm, node, shapes) -> Cost:
        return cost
    rule.free = True
    return rule


FREE = free()
FREE_EMBEDDING = free("embedding")


def per_element(flops_per_element: float, category: str = "elementwise") -> FlopRule:
    """``flops_per_element`` per element of the (floating) output."""
    def rule(gm, node, shapes) -> Cost:
        out = shapes[node]
        return Cost(category, flops_per_element * out.numel if _floating(out) else 0.0)
    return rule


ELEMENTWISE = per_element(1.0)
SOFTMAX = per_element(3.0)
BATCH_NORM = per_element(2.0, "norm")
NORM = per_element(5.0, "norm")


def weight_module(gm, node, shapes) -> Cost:
    """Linear, Conv, ConvTranspose modules (masked or not)."""
    out = shapes[node]
    if out is None:
        return Cost("weight", 0.0)
    module = gm.get_submodule(str(node.target))
    numel = module.weight.numel()
    nnz = planned_nnz(module) if isinstance(module, MaskedLayer) else numel
    if isinstance(module, nn.Linear):
        positions = out.numel // max(module.out_features, 1)
    elif getattr(module, "transposed", False):
        positions = _numel(shapes[node.args[0]]) // max(module.in_channels, 1)
    else:
        positions = out.numel // max(module.out_channels, 1)
    return Cost("weight", 2.0 * positions * numel, 2.0 * positions * nnz, numel, nnz)


def functional_linear(gm, node, shapes) -> Cost:
    args = _operands(node)
    weight = shapes[args[1]] if len(args) >= 2 else None
    return Cost("weight", 2.0 * _numel(shapes[node]) * weight.shape[-1] if weight else 0.0)


def functional_conv(gm, node, shapes) -> Cost:
    out, args = shapes[node], _operands(node)
    weight = shapes[args[1]] if len(args) >= 2 else None
    return Cost("weight", 2.0 * (out.numel // out.shape[1]) * weight.numel if weight and out else 0.0)


def _category(operands: List[fx.Node]) -> str:
    return "weight" if any(a.op == "get_attr" for a in operands) else "attention"


def _contraction(node: fx.Node, shapes: ShapeMap, operands: List[fx.Node]) -> Cost:
    out = shapes[node]
    first = shapes[operands[0]] if operands else None
    if out is None or first is None:
        return Cost(_category(operands), 0.0)
    return Cost(_category(operands), 2.0 * out.numel * first.shape[-1])


def matmul(gm, node, shapes) -> Cost:
    """matmul, mm, bmm: 2 M N K."""
    return _contraction(node, shapes, _operands(node))


def addmm(gm, node, shapes) -> Cost:
    """addmm, baddbmm: the first operand is the added term."""
    return _contraction(node, shapes, _operands(node)[1:])


def einsum(gm, node, shapes) -> Cost:
    """Operands contracted left to right; each pairwise step costs 2 x the product of its index sizes."""
    equation = node.args[0] if isinstance(node.args[0], str) else None
    operands = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    specs = [shapes[a] if isinstance(a, fx.Node) else None for a in operands]
    if equation is None or any(s is None for s in specs) or "..." in equation:
        return Cost(_category(_operands(node)), 0.0)
    inputs, _, output = equation.replace(" ", "").partition("->")
    terms = inputs.split(",")
    size = {}
    for term, spec in zip(terms, specs):
        size.update(zip(term, spec.shape))
    flops, current = 0.0, terms[0]
    for i, term in enumerate(terms[1:], start=1):
        later = set(output).union(*terms[i + 1:])
        indices = set(current) | set(term)
        flops += 2.0 * math.prod(size[c] for c in indices)
        current = "".join(c for c in indices if c in later)
    if len(terms) == 1 and set(current) - set(output):  # a reduction of one operand
        flops = float(math.prod(size[c] for c in current))
    category = _category([a for a in operands if isinstance(a, fx.Node)])
    return Cost(category, flops)


def sdpa(gm, node, shapes) -> Cost:
    q, k, v = (shapes[a] if isinstance(a, fx.Node) else None for a in node.args[:3])
    if not (q and k and v):
        return Cost("attention", 0.0)
    heads = math.prod(q.shape[:-2])
    length, source = q.shape[-2], k.shape[-2]
    return Cost("attention", heads * (2.0 * length * source * (q.shape[-1] + v.shape[-1]) + 3.0 * length * source))


def pool(gm, node, shapes) -> Cost:
    """Pooling modules with a kernel: kernel elements per output; otherwise one per input element."""
    out = shapes[node]
    if not _floating(out) and not isinstance(shapes.value(node), (tuple, list)):
        return Cost("pool", 0.0)
    if node.op == "call_module":
        kernel = getattr(gm.get_submodule(str(node.target)), "kernel_size", None)
        if kernel is not None and out is not None:
            kernel = kernel if isinstance(kernel, tuple) else (kernel,) * (len(out.shape) - 2)
            return Cost("pool", float(out.numel * math.prod(kernel)))
    inp = shapes[node.args[0]] if node.args and isinstance(node.args[0], fx.Node) else None
    return Cost("pool", float(_numel(inp)) if _floating(inp) else 0.0)


def maximum(gm, node, shapes) -> Cost:
    """torch.max/min: element-wise of two tensors, else a reduction."""
    if len(_operands(node)) >= 2:
        return ELEMENTWISE(gm, node, shapes)
    return pool(gm, node, shapes)


def embedding_bag(gm, node, shapes) -> Cost:
    """One add per gathered element: indices x embedding dim."""
    out = shapes[node]
    ids = shapes[node.args[0]] if node.args and isinstance(node.args[0], fx.Node) else None
    return Cost("embedding", float(_numel(ids) * out.shape[-1]) if out is not None and ids is not None else 0.0)
