"""Coupling rules of call_function / call_method nodes (see `coupling` for the table)."""
from __future__ import annotations

import builtins
import operator
from typing import Any, List, Optional, Tuple

import torch
import torch.fx as fx

from .axes import Const, Expr, Prod, Sum
from .coupling import COMPARISONS, PASSTHROUGH, _CLAMPS, Literal, SizeValue, _fresh_tree
from .ops import ELEMENTWISE_KINDS, NORM_KINDS, op_kind, op_name
from .shapes import TensorSpec

_VIEWS = {"view", "reshape", "_unsafe_view", "_reshape_alias"}
_REDUCE = {"mean", "sum", "amax", "amin", "max_reduce", "prod", "std", "var", "norm", "logsumexp", "all", "any"}
_CREATE = {"arange", "zeros", "ones", "full", "empty", "rand", "randn", "new_ones", "new_zeros", "new_full",
           "new_empty", "zeros_like", "ones_like", "full_like", "empty_like", "rand_like", "randn_like",
           "scalar_tensor", "tensor", "lift_fresh_copy", "_assert_tensor_metadata"}


def apply(b, node: fx.Node) -> Any:
    name = op_name(node)
    kind = op_kind(b.gm, node)
    if node.target is builtins.getattr:
        return _getattr(b, node)
    if name in ("size", "sym_size") or (node.op == "call_method" and node.target == "dim"):
        return _size(b, node)
    if node.target is operator.getitem:
        return _getitem(b, node)
    spec = b.shapes.value(node)
    if not isinstance(spec, (TensorSpec, tuple, list)) or _is_size_math(b, node):
        return _size_math(b, node)
    if name in _CREATE or kind == "assert":
        return _create(b, node)
    if kind in ELEMENTWISE_KINDS or kind in PASSTHROUGH or name in COMPARISONS or name in _CLAMPS \
            or name in ("masked_fill", "where", "type_as"):
        return _broadcast(b, node)
    if kind == "matmul" or name in ("matmul", "bmm", "mm"):
        return _matmul(b, node)
    if kind == "sdpa":
        return _sdpa(b, node)
    if kind == "cat":
        return _cat(b, node)
    if kind in ("split", "chunk", "unbind") or name in ("split_with_sizes", "tensor_split"):
        return _split(b, node, name)
    if name in _VIEWS or kind == "view":
        return _view(b, node)
    if kind == "flatten":
        return _flatten_op(b, node)
    if kind == "unflatten":
        return _unflatten(b, node)
    if kind in ("permute", "transpose"):
        return _permute(b, node, name)
    if kind in ("unsqueeze", "squeeze"):
        return _squeeze(b, node)
    if kind == "expand":
        return _expand(b, node)
    if kind in ("select", "slice"):
        return _select_slice(b, node, kind)
    if kind in _REDUCE or name in _REDUCE:
        return _reduce(b, node)
    if kind in NORM_KINDS:  # functional norms without parameters: shape-preserving
        x = b.axes_of(node.args[0])
        return x if x is not None else b.opaque(node, "norm of a non-tensor")
    if kind in ("max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool"):
        x = b.axes_of(node.args[0])
        return b.pool(node, x) if x is not None else b.opaque(node, "pooling of a non-tensor")
    return b.opaque(node, f"no coupling rule for {name}")


# -- sizes -------------------------------------------------------------------------------
def _getattr(b, node):
    x = b.axes_of(node.args[0])
    if node.args[1] == "shape" and x is not None:
        return SizeValue(x, single=False)
    return None


def _size(b, node):
    x = b.axes_of(node.args[0])
    if x is None:
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dim is None:
        return SizeValue(x, single=False)
    return SizeValue((x[dim],))


def _is_size_math(b, node) -> bool:
    return any(isinstance(b.result.values.get(a.name), SizeValue) for a in node.all_input_nodes) and \
        not isinstance(b.shapes.value(node), TensorSpec)


def _size_math(b, node):
    """Arithmetic on sizes: the result depends on its source axes but is no single axis."""
    sources: List[Expr] = []
    for arg in node.all_input_nodes:
        value = b.result.values.get(arg.name)
        if isinstance(value, SizeValue):
            sources.extend(e for e in value.exprs if e is not None)
            sources.extend(value.sources)
    return SizeValue((None,), tuple(sources)) if sources else None


def _getitem(b, node):
    source, index = node.args
    value = b.result.values.get(source.name) if isinstance(source, fx.Node) else None
    if isinstance(value, SizeValue):
        picked = value.exprs[index]
        if isinstance(index, slice):
            return SizeValue(tuple(picked), value.sources, single=False)
        return SizeValue((picked,), value.sources)
    if isinstance(value, tuple) and value and isinstance(value[0], tuple) and isinstance(index, int):
        return value[index]  # one output of split/chunk
    if isinstance(value, tuple) and isinstance(b.shapes.value(source), TensorSpec):
        return _index(b, node, value, index)
    if isinstance(value, tuple) and isinstance(index, int) and index < len(value):
        return value[index]
    return b.opaque(node, "indexing without a rule")


def _index(b, node, x, index):
    items = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, fx.Node) or isinstance(i, (list, torch.Tensor)) for i in items):
        return b.opaque(node, "advanced (tensor) indexing")
    if Ellipsis in items:
        at = items.index(Ellipsis)
        used = sum(1 for i in items if i is not None and i is not Ellipsis)
        items = items[:at] + (slice(None),) * (len(x) - used) + items[at + 1:]
    out: List[Expr] = []
    position = 0
    spec = b.shapes[node]
    for item in items:
        if item is None:
            out.append(Const(1))
            continue
        if isinstance(item, int):
            position += 1
            continue
        if isinstance(item, slice):
            axis = x[position]
            if item == slice(None):
                out.append(axis)
            else:
                b.axes.pin(axis, f"partly sliced at {node.name}")
                out.append(b.axes.new(spec.shape[len(out)], f"{node.name}", "slice"))
            position += 1
    out.extend(x[position:])
    return tuple(out)


# -- element-wise and broadcast ----------------------------------------------------------
def _broadcast(b, node):
    tensors = [a for a in node.all_input_nodes if b.axes_of(a) is not None
               and isinstance(b.shapes.value(a), TensorSpec)]
    out_spec = b.shapes[node]
    if out_spec is None:
        return b.opaque(node, "element-wise op with no tensor output")
    rank = len(out_spec.shape)
    out: List[Optional[Expr]] = [None] * rank
    for arg in tensors:
        axes, shape = b.axes_of(arg), b.shapes[arg].shape
        for offset in range(1, len(shape) + 1):
            if shape[-offset] == 1 and out_spec.shape[-offset] != 1:
                continue
            current = out[-offset]
            if current is None:
                out[-offset] = axes[-offset]
            else:
                b.axes.unify(current, axes[-offset], node.name)
    return tuple(o if o is not None else b.axes.new(out_spec.shape[i], node.name, "broadcast")
                 for i, o in enumerate(out))


# -- attention ---------------------------------------------------------------------------
def _matmul(b, node):
    left, right = (b.axes_of(a) for a in node.args[:2])
    params = [a for a in node.args[:2] if isinstance(a, fx.Node) and a.op == "get_attr"]
    if left is None or right is None or len(left) < 2 or len(right) < 2:
        return b.opaque(node, "matmul of vectors")
    b.axes.unify(left[-1], right[-2], node.name)
    batch = _broadcast_batch(b, node, left[:-2], right[:-2])
    if not params and b.attention_width == "keep":
        reason = f"attention width kept (attention_width=keep) at {node.name}"
        b.axes.pin(left[-1], reason)
        b.axes.pin(right[-1], reason)
    return batch + (left[-2], right[-1])


def _broadcast_batch(b, node, xs, ys):
    out = list(xs) if len(xs) >= len(ys) else list(ys)
    for offset in range(1, min(len(xs), len(ys)) + 1):
        b.axes.unify(xs[-offset], ys[-offset], node.name)
    return tuple(out)


def _sdpa(b, node):
    q, k, v = (b.axes_of(a) for a in node.args[:3])
    if q is None or k is None or v is None:
        return b.opaque(node, "attention without tensor inputs")
    b.axes.unify(q[-1], k[-1], node.name)
    b.axes.unify(k[-2], v[-2], node.name)
    batch = _broadcast_batch(b, node, q[:-2], k[:-2])
    _broadcast_batch(b, node, k[:-2], v[:-2])
    if b.attention_width == "keep":
        reason = f"attention width kept (attention_width=keep) at {node.name}"
        b.axes.pin(q[-1], reason)
        b.axes.pin(v[-1], reason)
    else:
        scale = node.kwargs.get("scale")
        if isinstance(scale, float):
            b.result.sdpa_scales.append((node.name, q[-1]))
    return batch + (q[-2], v[-1])


# -- joining and splitting ---------------------------------------------------------------
def _dim(node, position, default, rank):
    dim = node.args[position] if len(node.args) > position else node.kwargs.get("dim", default)
    return dim % rank if isinstance(dim, int) else dim


def _cat(b, node):
    tensors = node.args[0]
    parts = [b.axes_of(t) for t in tensors]
    if any(p is None for p in parts):
        return b.opaque(node, "cat of non-tensors")
    parts = [p for p, t in zip(parts, tensors) if b.shapes[t].numel > 0]
    rank = len(parts[0])
    dim = _dim(node, 1, 0, rank)
    for p in parts[1:]:
        for axis in range(rank):
            if axis != dim:
                b.axes.unify(parts[0][axis], p[axis], node.name)
    joined = Sum(tuple(p[dim] for p in parts)) if len(parts) > 1 else parts[0][dim]
    return parts[0][:dim] + (joined,) + parts[0][dim + 1:]


def _split(b, node, name):
    x = b.axes_of(node.args[0])
    outs = b.shapes.value(node)
    if x is None or not isinstance(outs, (tuple, list)):
        return b.opaque(node, f"{name} without tensor parts")
    rank = len(x)
    kind = op_kind(b.gm, node)
    if kind == "unbind":
        dim = _dim(node, 1, 0, rank)
        b.axes.pin(x[dim], f"unbound at {node.name}")
        return tuple(x[:dim] + x[dim + 1:] for _ in outs)
    dim = _dim(node, 2, 0, rank) if kind != "chunk" else _dim(node, 2, 0, rank)
    sizes = [o.shape[dim] for o in outs]
    arg = node.args[1] if len(node.args) > 1 else node.kwargs.get("split_size_or_sections",
                                                                    node.kwargs.get("split_size"))
    equal = kind == "chunk" or isinstance(arg, int)
    if equal and len(set(sizes)) == 1:
        part = b.axes.new(sizes[0], f"{node.name}.part")
        parts = [part] * len(sizes)
        if isinstance(arg, int) and kind != "chunk":
            b.result.literals.append(Literal(node.name, 1, None, part, arg))
    else:
        parts = [b.axes.new(s, f"{node.name}.part{i}") for i, s in enumerate(sizes)]
        if isinstance(arg, (list, tuple)):
            for i, (value, part) in enumerate(zip(arg, parts)):
                if isinstance(value, int):
                    b.result.literals.append(Literal(node.name, 1, i, part, value))
        elif equal:  # uneven last chunk: sizes cannot follow a widened axis
            for part in parts:
                b.axes.pin(part, f"uneven split at {node.name}")
    b.axes.unify(x[dim], Sum(tuple(parts)), node.name)
    return tuple(x[:dim] + (p,) + x[dim + 1:] for p in parts)


# -- views ---------------------------------------------------------------------------------
def _view(b, node):
    x = b.axes_of(node.args[0])
    if x is None:
        return b.opaque(node, "view of a non-tensor")
    args = node.args[1:]
    packed = len(args) == 1 and isinstance(args[0], (list, tuple))
    sizes = list(args[0]) if packed else list(args)
    slots = [(1, i) if packed else (1 + i, None) for i in range(len(sizes))]
    return view_axes(b, node, x, list(zip(sizes, slots)))


def _flatten_op(b, node):
    x = b.axes_of(node.args[0])
    if x is None:
        return b.opaque(node, "flatten of a non-tensor")
    return view_axes(b, node, x, None)


def _unflatten(b, node):
    x = b.axes_of(node.args[0])
    if x is None:
        return b.opaque(node, "unflatten of a non-tensor")
    dim = node.args[1] % len(x)
    sizes = list(node.args[2])
    out_rank = len(b.shapes[node].shape)
    positional: List[Tuple[Any, Tuple[int, Optional[int]]]] = [(None, (0, None))] * out_rank
    for i, size in enumerate(sizes):
        positional[dim + i] = (size, (2, i))
    return view_axes(b, node, x, positional)


def view_axes(b, node, x, size_args: Optional[List[Tuple[Any, Tuple[int, Optional[int]]]]]):
    """Map input axes to output axes by size products (see the module docstring of coupling)."""
    in_shape = b.shapes[node.args[0]].shape
    out_shape = b.shapes[node].shape
    out: List[Optional[Expr]] = [None] * len(out_shape)
    i = j = 0
    while i < len(in_shape) or j < len(out_shape):
        if j < len(out_shape) and out_shape[j] == 1:
            out[j] = Const(1)
            j += 1
            continue
        if i < len(in_shape) and in_shape[i] == 1:
            i += 1
            continue
        if i >= len(in_shape) or j >= len(out_shape):
            break
        group_in, group_out = [i], [j]
        p_in, p_out = in_shape[i], out_shape[j]
        while p_in != p_out:
            if p_in < p_out:
                i += 1
                group_in.append(i)
                p_in *= in_shape[i]
            else:
                j += 1
                group_out.append(j)
                p_out *= out_shape[j]
        _map_group(b, node, x, group_in, group_out, out, out_shape)
        i, j = group_in[-1] + 1, group_out[-1] + 1
    for position, expr in enumerate(out):
        if expr is None:
            out[position] = Const(out_shape[position])
    if size_args:
        _link_sizes(b, node, out, size_args)
    return tuple(out)


def _map_group(b, node, x, group_in, group_out, out, out_shape) -> None:
    ins = [x[k] for k in group_in if b.shapes[node.args[0]].shape[k] != 1]
    if len(group_out) == 1:
        out[group_out[0]] = ins[0] if len(ins) == 1 else Prod(tuple(ins))
    elif len(ins) == 1:
        # a split of one axis: the leading factors (heads, groups) keep their count
        new = [b.axes.new(out_shape[k], f"{node.name}[{k}]", "split count" if k != group_out[-1] else None)
               for k in group_out]
        for k, expr in zip(group_out, new):
            out[k] = expr
        b.axes.unify(ins[0], Prod(tuple(new)), node.name)
    else:
        reason = f"reshaped across several axes at {node.name}"
        for expr in ins:
            b.axes.pin(expr, reason)
        for k in group_out:
            out[k] = b.axes.new(out_shape[k], node.name, reason)


def _link_sizes(b, node, out, size_args) -> None:
    """Literal sizes must follow their axis; sizes read from tensors couple with them."""
    for position, (size, slot) in enumerate(size_args):
        if position >= len(out) or size is None:
            continue
        expr = out[position]
        if isinstance(size, int):
            if size != -1 and not isinstance(expr, Const):
                b.result.literals.append(Literal(node.name, slot[0], slot[1], expr, size))
        elif isinstance(size, fx.Node):
            value = b.result.values.get(size.name)
            if isinstance(value, SizeValue) and value.single and value.exprs[0] is not None:
                b.axes.unify(expr, value.exprs[0], node.name)
            elif isinstance(value, SizeValue):
                reason = f"size computed from other axes at {node.name}"
                b.axes.pin(expr, reason)
                for source in value.sources:
                    b.axes.pin(source, reason)


def _permute(b, node, name):
    x = b.axes_of(node.args[0])
    if x is None:
        return b.opaque(node, "permute of a non-tensor")
    rank = len(x)
    if name == "t":
        return tuple(reversed(x))
    if op_kind(b.gm, node) == "transpose" and name != "permute":
        d0, d1 = node.args[1] % rank, node.args[2] % rank
        out = list(x)
        out[d0], out[d1] = out[d1], out[d0]
        return tuple(out)
    dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    return tuple(x[d % rank] for d in dims)


def _squeeze(b, node):
    x = b.axes_of(node.args[0])
    if x is None:
        return b.opaque(node, "squeeze of a non-tensor")
    in_shape, out_shape = b.shapes[node.args[0]].shape, b.shapes[node].shape
    if op_kind(b.gm, node) == "unsqueeze":
        dim = node.args[1] % (len(x) + 1)
        return x[:dim] + (Const(1),) + x[dim:]
    kept = [a for a, s in zip(x, in_shape) if s != 1]
    if len(kept) == len(out_shape):
        return tuple(kept)
    return view_axes(b, node, x, None)


def _expand(b, node):
    x = b.axes_of(node.args[0])
    if x is None:
        return b.opaque(node, "expand of a non-tensor")
    out_shape = b.shapes[node].shape
    in_shape = b.shapes[node.args[0]].shape
    lead = len(out_shape) - len(x)
    out = [b.axes.new(d, node.name, "expanded") for d in out_shape[:lead]]
    for axis, (expr, size) in enumerate(zip(x, in_shape)):
        out.append(expr if size == out_shape[lead + axis] else b.axes.new(out_shape[lead + axis], node.name,
                                                                           "expanded"))
    return tuple(out)


def _select_slice(b, node, kind):
    x = b.axes_of(node.args[0])
    if x is None:
        return b.opaque(node, "slice of a non-tensor")
    dim = (node.args[1] if len(node.args) > 1 else 0) % len(x)
    if kind == "select":
        return x[:dim] + x[dim + 1:]
    in_size, out_size = b.shapes[node.args[0]].shape[dim], b.shapes[node].shape[dim]
    if in_size == out_size:
        return x
    b.axes.pin(x[dim], f"partly sliced at {node.name}")
    return x[:dim] + (b.axes.new(out_size, node.name, "slice"),) + x[dim + 1:]


def _reduce(b, node):
    x = b.axes_of(node.args[0])
    if x is None:
        return b.opaque(node, "reduction of a non-tensor")
    out_shape = b.shapes[node].shape
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None:
        return tuple(Const(1) for _ in out_shape)
    dims = {d % len(x) for d in (dims if isinstance(dims, (list, tuple)) else (dims,))}
    keep = len(out_shape) == len(x)
    return tuple((Const(1) if keep else None) if i in dims else a for i, a in enumerate(x)
                 if keep or i not in dims)


def _create(b, node):
    return _fresh_tree(b, b.shapes.value(node), node.name, "created in the graph")
