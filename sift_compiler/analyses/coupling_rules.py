"""Coupling rules of the op table (`ops`): how an op's output axes relate to its inputs' axes.

A rule is ``rule(b, node) -> value`` where ``b`` is the builder of `coupling` (the axis graph in
``b.axes``, the values of earlier nodes in ``b.result.values``). A value is a tuple of axis
expressions for a tensor, a tuple of those for several tensors, or a `SizeValue` for ints read
from shapes. Rules that read their first argument's axes are wrapped in `on_tensor`: applied to
anything else, the op has no rule and pins what it touches. Views, joins and splits are in
`coupling_views`.
"""
from __future__ import annotations

import functools
import operator
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

import torch.fx as fx
import torch.utils._pytree as pytree

from ..errors import describe_node
from .axes import Const, Expr, FloorDiv, Prod, Sum
from .shapes import TensorSpec

CouplingRule = Callable[[Any, fx.Node], Any]


@dataclass(frozen=True)
class SizeValue:
    """Ints read from tensor shapes: each an axis expression (``C``, ``C // 4``, ``3 * C``), or
    None when computed in a way the algebra does not follow (``sources``: the axes it read)."""

    exprs: Tuple[Optional[Expr], ...]
    sources: Tuple[Expr, ...] = ()
    single: bool = True


@dataclass
class Literal:
    """A size argument of a node that must follow an axis: node.args[index][slot] (slot None:
    node.args[index]). ``value`` is the size today. The argument is an int in the code, or a node
    computing ``source`` (or something from the ``computed`` axes); Sparse Wide writes the new
    size as an int where the node would no longer compute it."""

    node: str
    index: int
    slot: Optional[int]
    expr: Expr
    value: int
    source: Optional[Expr] = None
    computed: Tuple[Expr, ...] = ()


@dataclass(frozen=True)
class SizeLink:
    """A size argument given by a node (``view(B, T, C // n_head)``): settled after the walk."""

    node: str
    index: int
    slot: Optional[int]
    axis: Expr
    size: SizeValue


def on_tensor(what: str) -> Callable[[Callable], CouplingRule]:
    """Decorator: the rule gets its first argument's axes ``x``; a non-tensor there is opaque."""
    def wrap(rule: Callable) -> CouplingRule:
        @functools.wraps(rule)
        def checked(b, node: fx.Node):
            x = b.axes_of(node.args[0]) if node.args else None
            if x is None:
                return b.opaque(node, f"{what} of a non-tensor")
            return rule(b, node, x)
        return checked
    return wrap


def dim_arg(node: fx.Node, position: int, default: Any, rank: int) -> Any:
    dim = node.args[position] if len(node.args) > position else node.kwargs.get("dim", default)
    return dim % rank if isinstance(dim, int) else dim


def _module(b, node: fx.Node):
    return b.gm.get_submodule(str(node.target))


# -- modules -----------------------------------------------------------------------------
@on_tensor("Linear")
def linear_module(b, node, x):
    path, module, new = str(node.target), _module(b, node), b.axes.new
    m = b.module_axes(path, lambda: {"in": new(module.in_features, f"{path}.in"),
                                     "out": new(module.out_features, f"{path}.out")})
    b.axes.unify(x[-1], m["in"], path)
    return x[:-1] + (m["out"],)


@on_tensor("Conv")
def conv_module(b, node, x):
    path, module, new = str(node.target), _module(b, node), b.axes.new

    def make():
        cin = new(module.in_channels, f"{path}.in")
        depthwise = module.groups == module.in_channels == module.out_channels and module.groups > 1
        cout = cin if depthwise else new(module.out_channels, f"{path}.out")
        if module.groups > 1 and not depthwise:
            b.axes.require_multiple(cin, module.groups)
            b.axes.require_multiple(cout, module.groups)
        return {"in": cin, "out": cout, "depthwise": depthwise}
    m = b.module_axes(path, make)
    channel = len(x) - len(module.kernel_size) - 1
    b.axes.unify(x[channel], m["in"], path)
    spatial = tuple(new(d, f"{path}.spatial", "spatial size") for d in b.shapes[node].shape[channel + 1:])
    for axis in spatial:
        b.axes.mark_varying(axis)
    return x[:channel] + (m["out"],) + spatial


@on_tensor("BatchNorm")
def batch_norm_module(b, node, x):
    path, module = str(node.target), _module(b, node)
    m = b.module_axes(path, lambda: {"features": b.axes.new(module.num_features, f"{path}.features")})
    b.axes.unify(x[1], m["features"], path)
    return x


@on_tensor("GroupNorm")
def group_norm_module(b, node, x):
    path, module = str(node.target), _module(b, node)
    m = b.module_axes(path, lambda: {"features": b.axes.new(module.num_channels, f"{path}.features")})
    b.axes.require_multiple(m["features"], module.num_groups)
    b.axes.unify(x[1], m["features"], path)
    return x


@on_tensor("LayerNorm")
def layer_norm_module(b, node, x):
    path, module = str(node.target), _module(b, node)
    shape = tuple(module.normalized_shape)
    m = b.module_axes(path, lambda: {"shape": tuple(b.axes.new(d, f"{path}.shape") for d in shape)})
    for a, c in zip(x[-len(shape):], m["shape"]):
        b.axes.unify(a, c, path)
    return x


@on_tensor("Embedding")
def embedding_module(b, node, x):
    path, module = str(node.target), _module(b, node)
    m = b.module_axes(path, lambda: {"dim": b.axes.new(module.embedding_dim, f"{path}.dim")})
    b.tie(module.weight, (Const(module.num_embeddings), m["dim"]), path)
    return x + (m["dim"],)


@on_tensor("op")
def passthrough(b, node, x):
    """Shape-preserving ops of one tensor (activations, dropout, copies, modules alike)."""
    return x


@on_tensor("pooling")
def pool(b, node, x):
    """Batch and channels pass through; spatial sizes are new and fixed."""
    out = b.shapes[node] or next(s for s in b.shapes.value(node) if isinstance(s, TensorSpec))
    keep = 2 if len(x) >= 3 else 1
    spatial = tuple(b.axes.new(d, f"{node.name}.spatial", "spatial size") for d in out.shape[keep:])
    for axis in spatial:
        b.axes.mark_varying(axis)
    value = x[:keep] + spatial
    return value if b.shapes[node] is not None else tuple(value for _ in b.shapes.value(node))


# -- functional weight ops and norms -------------------------------------------------------
def _tensor_args(b, node, start: int = 1) -> List[Tuple[Expr, ...]]:
    return [b.axes_of(a) for a in list(node.args[start:]) + list(node.kwargs.values())
            if isinstance(a, fx.Node) and b.axes_of(a) is not None]


def _with_statistics(b, node, x):
    """ATen norms return (out, mean, rstd): the statistics are fixed-size side outputs."""
    value = b.shapes.value(node)
    if isinstance(value, (tuple, list)):
        return (x,) + tuple(b.fresh_tree(v, node.name, "norm statistics") for v in value[1:])
    return x


@on_tensor("norm")
def channel_norm(b, node, x):
    """batch_norm / instance_norm / group_norm: per-channel tensors follow axis 1."""
    for t in _tensor_args(b, node):
        if len(t) == 1:
            b.axes.unify(x[1], t[0], node.name)
    name = getattr(node.target, "__name__", str(node.target))
    position = 6 if "native_group_norm" in name else 1  # (x, weight, bias, N, C, HxW, group, eps)
    groups = node.args[position] if len(node.args) > position else None
    if isinstance(groups, int) and "group_norm" in name:
        b.axes.require_multiple(x[1], groups)
    return _with_statistics(b, node, x)


@on_tensor("norm")
def last_dims_norm(b, node, x):
    """layer_norm / rms_norm: the weight and bias follow the normalized trailing axes."""
    for t in _tensor_args(b, node):
        for a, c in zip(x[-len(t):], t):
            b.axes.unify(a, c, node.name)
    return _with_statistics(b, node, x)


@on_tensor("linear")
def functional_linear(b, node, x):
    """F.linear(x, W, bias): x[-1] = W[1]; the output axis is W[0] (and the bias)."""
    weight = b.axes_of(node.args[1]) if len(node.args) > 1 else b.axes_of(node.kwargs.get("weight"))
    if weight is None or len(weight) != 2:
        return b.opaque(node, "linear with a non-tensor weight")
    b.axes.unify(x[-1], weight[1], node.name)
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if b.axes_of(bias) is not None:
        b.axes.unify(weight[0], b.axes_of(bias)[0], node.name)
    return x[:-1] + (weight[0],)


def _embedding(b, node, ids_arg, weight_arg):
    ids, weight = b.axes_of(ids_arg), b.axes_of(weight_arg)
    if ids is None or weight is None or len(weight) != 2:
        return b.opaque(node, "embedding of non-tensors")
    b.axes.pin(weight[0], "vocabulary")
    return ids + (weight[1],)


def functional_embedding(b, node):
    """F.embedding(ids, weight)."""
    return _embedding(b, node, node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("weight"))


def aten_embedding(b, node):
    """torch.embedding / aten.embedding(weight, ids)."""
    return _embedding(b, node, node.args[1], node.args[0])


# -- element-wise and broadcast ----------------------------------------------------------
def copy_into(b, node):
    """dst.copy_(src) (DeepSeek-V3 fills its key from k_nope and k_rot): src broadcasts onto dst,
    the result is dst; a one-tensor copy passes its axes."""
    if len([a for a in node.args[:2] if isinstance(a, fx.Node)]) < 2:
        x = b.axes_of(node.args[0])
        return b.opaque(node, "copy of a non-tensor") if x is None else x
    return broadcast(b, node)


def broadcast(b, node):
    """Element-wise ops: equal axes of size > 1 of all tensor operands are unified."""
    tensors = [a for a in node.all_input_nodes if b.axes_of(a) is not None
               and isinstance(b.shapes.value(a), TensorSpec)]
    out_spec = b.shapes[node]
    if out_spec is None:
        return b.opaque(node, "element-wise op with no tensor output")
    rank = len(out_spec.shape)
    out: List[Optional[Expr]] = [None] * rank
    for arg in tensors:
        axes, shape = b.axes_of(arg), b.shapes[arg].shape
        for offset in range(1, min(len(shape), rank) + 1):
            if shape[-offset] == 1 and out_spec.shape[-offset] != 1:
                continue
            current = out[-offset]
            if current is None:
                out[-offset] = axes[-offset]
            else:
                b.axes.unify(current, axes[-offset], node.name)
    return tuple(o if o is not None else b.axes.new(out_spec.shape[i], node.name, "broadcast")
                 for i, o in enumerate(out))


def maximum(b, node):
    """torch.max/min: element-wise of two tensors, else a reduction (values, indices)."""
    if len([a for a in node.args if isinstance(a, fx.Node)]) >= 2:
        return broadcast(b, node)
    return reduce(b, node)


# -- attention ---------------------------------------------------------------------------
def _contract(b, node, left_arg, right_arg):
    left, right = b.axes_of(left_arg), b.axes_of(right_arg)
    params = [a for a in (left_arg, right_arg) if isinstance(a, fx.Node) and a.op == "get_attr"]
    if left is None or right is None or len(left) < 2 or len(right) < 2:
        return b.opaque(node, "matmul of vectors")
    b.axes.unify(left[-1], right[-2], node.name)
    batch = broadcast_batch(b, node, left[:-2], right[:-2])
    if not params and b.attention_width == "keep":
        reason = f"attention width kept (attention_width=keep) at {node.name}"
        b.axes.pin(left[-1], reason, asked=True)
        b.axes.pin(right[-1], reason, asked=True)
    return batch + (left[-2], right[-1])


def matmul(b, node):
    """matmul/mm/bmm: the contracted axes are equal; activations x activations is attention."""
    return _contract(b, node, node.args[0], node.args[1])


def addmm(b, node):
    """addmm/baddbmm(input, a, b): the product's axes, and the added term broadcast onto them."""
    out = _contract(b, node, node.args[1], node.args[2])
    added = b.axes_of(node.args[0])
    if added is not None and isinstance(out, tuple):
        for a, c in zip(reversed(added), reversed(out)):
            if not isinstance(a, Const):
                b.axes.unify(a, c, node.name)
    return out


def einsum(b, node):
    """einsum("bhqd,bhkd->bhqk", q, k): axes with the same letter are equal; like a matmul of two
    activations, with attention_width="keep" the letters not shared by every operand are pinned."""
    equation = node.args[0] if node.args and isinstance(node.args[0], str) else None
    operands = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    axes = [b.axes_of(a) for a in operands]
    if equation is None or "..." in equation or "->" not in equation or any(a is None for a in axes):
        return b.opaque(node, "einsum with an ellipsis, an implicit output or non-tensor operands")
    inputs, output = equation.replace(" ", "").split("->")
    letters = {}
    for term, x in zip(inputs.split(","), axes):
        for letter, expr in zip(term, x):
            if letter in letters:
                b.axes.unify(letters[letter], expr, node.name)
            else:
                letters[letter] = expr
    if b.attention_width == "keep" and not any(isinstance(a, fx.Node) and a.op == "get_attr" for a in operands):
        shared = set.intersection(*(set(term) for term in inputs.split(",")))
        for letter in set(letters) - shared:
            b.axes.pin(letters[letter], f"attention width kept (attention_width=keep) at {node.name}", asked=True)
    return tuple(letters[letter] for letter in output)


def broadcast_batch(b, node, xs, ys):
    out = list(xs) if len(xs) >= len(ys) else list(ys)
    for offset in range(1, min(len(xs), len(ys)) + 1):
        b.axes.unify(xs[-offset], ys[-offset], node.name)
    return tuple(out)


def sdpa(b, node):
    q, k, v = (b.axes_of(a) for a in node.args[:3])
    if q is None or k is None or v is None:
        return b.opaque(node, "attention without tensor inputs")
    b.axes.unify(q[-1], k[-1], node.name)
    b.axes.unify(k[-2], v[-2], node.name)
    batch = broadcast_batch(b, node, q[:-2], k[:-2])
    broadcast_batch(b, node, k[:-2], v[:-2])
    if b.attention_width == "keep":
        reason = f"attention width kept (attention_width=keep) at {node.name}"
        b.axes.pin(q[-1], reason, asked=True)
        b.axes.pin(v[-1], reason, asked=True)
        for heads in (x[-3] for x in (q, k, v) if len(x) >= 3):  # heads x head_dim, both kept
            b.axes.pin(heads, reason, asked=True)
    else:
        scale = node.kwargs.get("scale")
        if isinstance(scale, float):
            b.result.sdpa_scales.append((node.name, q[-1]))
    # the mask (T5's relative position bias: one score per head) broadcasts onto the scores
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    scores = b.axes_of(mask) if isinstance(mask, fx.Node) else None
    if scores is not None:
        for a, c in zip(reversed(scores), reversed(batch + (q[-2], k[-2]))):
            if not isinstance(a, Const) and not isinstance(c, Const):
                b.axes.unify(a, c, node.name)
    return batch + (q[-2], v[-1])


# -- reductions, creation, sizes ---------------------------------------------------------
def reduce(b, node, dim_position: int = 1):
    """mean/sum/amax/std/...: reduced axes vanish (or become 1 with keepdim)."""
    x = b.axes_of(node.args[0]) if node.args else None
    if x is None:
        return b.opaque(node, "reduction of a non-tensor")
    value = b.shapes.value(node)
    out_spec = value if isinstance(value, TensorSpec) else next(v for v in value if isinstance(v, TensorSpec))
    dims = node.args[dim_position] if len(node.args) > dim_position else node.kwargs.get("dim")
    if dims is None:
        out = tuple(Const(1) for _ in out_spec.shape)
    else:
        dims = {d % len(x) for d in (dims if isinstance(dims, (list, tuple)) else (dims,))}
        keep = len(out_spec.shape) == len(x)
        out = tuple((Const(1) if keep else None) if i in dims else a for i, a in enumerate(x)
                    if keep or i not in dims)
    return out if isinstance(value, TensorSpec) else tuple(out for _ in value)


def norm_reduce(b, node):
    """torch.norm(x, p, dim): the dims are the third argument."""
    return reduce(b, node, dim_position=2)


def create(b, node):
    """Tensors made in the graph (arange, eye, ...): new axes of fixed size."""
    return b.fresh_tree(b.shapes.value(node), node.name, f"created in the graph at {describe_node(node)}")


def sized(first: int) -> CouplingRule:
    """zeros/ones/full/empty/rand(sizes...) from args[first]: a size read from a tensor makes
    the new axis follow that axis; literal sizes stay fixed."""
    def rule(b, node):
        spec = b.shapes.value(node)
        if not isinstance(spec, TensorSpec):
            return create(b, node)
        arg = node.args[first] if len(node.args) > first else node.kwargs.get("size")
        value = b.result.values.get(arg.name) if isinstance(arg, fx.Node) else None
        if isinstance(arg, (list, tuple)):
            sizes = list(arg)
        elif isinstance(value, SizeValue) and not value.single:
            sizes = list(value.exprs)
        else:
            sizes = list(node.args[first:])
        out = []
        for i, d in enumerate(spec.shape):
            size = sizes[i] if len(sizes) == len(spec.shape) else None
            known = b.result.values.get(size.name) if isinstance(size, fx.Node) else size
            expr = known.exprs[0] if isinstance(known, SizeValue) and known.single else known
            if isinstance(expr, (int, type(None))) or b.axes.original(expr) != d:
                expr = b.axes.new(d, f"{node.name}[{i}]", "created in the graph")
            out.append(expr)
        return tuple(out)
    return rule


def getattr_rule(b, node):
    x = b.axes_of(node.args[0])
    if node.args[1] == "shape" and x is not None:
        return SizeValue(x, single=False)
    return None


def size(b, node):
    x = b.axes_of(node.args[0])
    if x is None:
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dim is None:
        return SizeValue(x, single=False)
    return SizeValue((x[dim],))


def no_axes(b, node):
    """Values without axes (a rank, an assertion)."""
    return None


def size_math(b, node):
    """Arithmetic on sizes: ``C // n``, ``k * C``, ``C + k`` (and of two sizes) stay axis
    expressions; anything else is a size computed from ``sources``."""
    args = [b.result.values.get(a.name) if isinstance(a, fx.Node) else a for a in node.args]
    sources: List[Expr] = []
    for value in args:
        if isinstance(value, SizeValue):
            sources.extend(e for e in value.exprs if e is not None)
            sources.extend(value.sources)
    if not sources:
        return None
    terms = [_size_expr(a) for a in args]
    expr = _algebra(node.target, terms) if len(terms) == 2 and None not in terms else None
    return SizeValue((expr,), tuple(sources))


def _size_expr(value) -> Optional[Expr]:
    if isinstance(value, SizeValue) and value.single:
        return value.exprs[0]
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return Const(value)
    return None


def _algebra(target, terms) -> Optional[Expr]:
    a, c = terms
    if target is operator.floordiv and isinstance(c, Const) and c.value > 0:
        return Const(a.value // c.value) if isinstance(a, Const) else (a if c.value == 1 else FloorDiv(a, c.value))
    if target is operator.mul:
        if isinstance(a, Const) and isinstance(c, Const):
            return Const(a.value * c.value)
        return c if a == Const(1) else a if c == Const(1) else Prod((a, c))
    if target is operator.add:
        if isinstance(a, Const) and isinstance(c, Const):
            return Const(a.value + c.value)
        return c if a == Const(0) else a if c == Const(0) else Sum((a, c))
    return None


def reads_sizes(b, node) -> bool:
    """An op on sizes read from shapes that makes no tensor (``C // n_head``)."""
    return any(isinstance(b.result.values.get(a.name), SizeValue) for a in node.all_input_nodes) and \
        not any(isinstance(v, TensorSpec) for v in pytree.tree_leaves(b.shapes.value(node)))

