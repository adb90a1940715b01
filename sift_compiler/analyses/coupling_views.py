"""Coupling rules of views, joins and splits (see `coupling_rules` for the rule contract).

- cat: the joined axis is the Sum of the parts; stack adds an axis of fixed size;
- split/chunk: the axis equals the Sum of the parts; literal split sizes are recorded so Sparse
  Wide can rewrite them;
- view/reshape/flatten/unflatten: input and output axes are matched by size products; merges
  become a Prod, a split of one axis defines it as a Prod of new axes (the leading ones, heads or
  groups, keep their count); literal sizes are recorded, sizes read from tensors couple;
- permute/transpose/squeeze/expand/select/slice/indexing/pad move, add or drop axes; a partial
  slice or a pad pins the axis it cuts.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
import torch.fx as fx

from .axes import Const, Expr, Prod, Sum, symbols
from .coupling_rules import Literal, SizeLink, SizeValue, dim_arg, on_tensor
from .shapes import TensorSpec

SizeArgs = Optional[List[Tuple[Any, Tuple[int, Optional[int]]]]]


# -- joining and splitting ---------------------------------------------------------------
def cat(b, node):
    tensors = node.args[0]
    parts = [b.axes_of(t) for t in tensors]
    if not parts or any(p is None for p in parts):
        return b.opaque(node, "cat of non-tensors")
    parts = [p for p, t in zip(parts, tensors) if b.shapes[t].numel > 0]
    rank = len(parts[0])
    dim = dim_arg(node, 1, 0, rank)
    for p in parts[1:]:
        for axis in range(rank):
            if axis != dim:
                b.axes.unify(parts[0][axis], p[axis], node.name)
    joined = Sum(tuple(p[dim] for p in parts)) if len(parts) > 1 else parts[0][dim]
    return parts[0][:dim] + (joined,) + parts[0][dim + 1:]


def stack(b, node):
    parts = [b.axes_of(t) for t in node.args[0]]
    if not parts or any(p is None for p in parts):
        return b.opaque(node, "stack of non-tensors")
    for p in parts[1:]:
        for a, c in zip(parts[0], p):
            b.axes.unify(a, c, node.name)
    dim = dim_arg(node, 1, 0, len(parts[0]) + 1)
    return parts[0][:dim] + (b.axes.new(len(parts), f"{node.name}.stacked", "stack count"),) + parts[0][dim:]


def _parts(b, node, x, dim, sizes, equal: bool):
    """New axes for the parts of a split of ``x[dim]``; equal parts share one symbol."""
    if equal and len(set(sizes)) == 1:
        parts = [b.axes.new(sizes[0], f"{node.name}.part")] * len(sizes)
    else:
        parts = [b.axes.new(s, f"{node.name}.part{i}") for i, s in enumerate(sizes)]
    b.axes.unify(x[dim], Sum(tuple(parts)), node.name)
    return parts


@on_tensor("split")
def split(b, node, x):
    """split(x, size or sizes, dim): sizes given as ints are recorded to follow their part."""
    outs = b.shapes.value(node)
    dim = dim_arg(node, 2, 0, len(x))
    sizes = [o.shape[dim] for o in outs]
    arg = node.args[1] if len(node.args) > 1 else node.kwargs.get("split_size_or_sections",
                                                                    node.kwargs.get("split_size"))
    size = b.result.values.get(arg.name) if isinstance(arg, fx.Node) else None
    one_size = isinstance(arg, int) or isinstance(size, SizeValue) and size.single
    parts = _parts(b, node, x, dim, sizes, equal=one_size)
    if one_size and len(set(sizes)) > 1:  # uneven last part: sizes cannot follow a widened axis
        for part in parts:
            b.axes.pin(part, f"uneven split at {node.name}")
    elif isinstance(arg, int):
        b.result.literals.append(Literal(node.name, 1, None, parts[0], arg))
    elif one_size:
        b.links.append(SizeLink(node.name, 1, None, parts[0], size))
    elif isinstance(arg, (list, tuple)):
        for i, (value, part) in enumerate(zip(arg, parts)):
            if isinstance(value, int):
                b.result.literals.append(Literal(node.name, 1, i, part, value))
            elif isinstance(b.result.values.get(getattr(value, "name", None)), SizeValue):
                b.links.append(SizeLink(node.name, 1, i, part, b.result.values[value.name]))
    return tuple(x[:dim] + (p,) + x[dim + 1:] for p in parts)


@on_tensor("chunk")
def chunk(b, node, x):
    """chunk(x, n, dim) and tensor_split(x, n, dim): n equal parts (an uneven last one pins them)."""
    outs = b.shapes.value(node)
    dim = dim_arg(node, 2, 0, len(x))
    sizes = [o.shape[dim] for o in outs]
    if not isinstance(node.args[1] if len(node.args) > 1 else None, int):
        return b.opaque(node, "split at given indices")
    parts = _parts(b, node, x, dim, sizes, equal=True)
    if len(set(sizes)) > 1:
        for part in parts:
            b.axes.pin(part, f"uneven split at {node.name}")
    return tuple(x[:dim] + (p,) + x[dim + 1:] for p in parts)


@on_tensor("unbind")
def unbind(b, node, x):
    dim = dim_arg(node, 1, 0, len(x))
    b.axes.pin(x[dim], f"unbound at {node.name}")
    return tuple(x[:dim] + x[dim + 1:] for _ in b.shapes.value(node))


# -- views ---------------------------------------------------------------------------------
@on_tensor("view")
def view(b, node, x):
    args = node.args[1:]
    packed = len(args) == 1 and isinstance(args[0], (list, tuple))
    sizes = list(args[0]) if packed else list(args)
    slots = [(1, i) if packed else (1 + i, None) for i in range(len(sizes))]
    return view_axes(b, node, x, list(zip(sizes, slots)))


@on_tensor("flatten")
def flatten(b, node, x):
    return view_axes(b, node, x, None)


@on_tensor("unflatten")
def unflatten(b, node, x):
    """torch.unflatten(x, dim, sizes); the literal sizes follow their axes."""
    dim, sizes = node.args[1] % len(x), list(node.args[2])
    positional: List[Tuple[Any, Tuple[int, Optional[int]]]] = [(None, (0, None))] * len(b.shapes[node].shape)
    for i, size in enumerate(sizes):
        positional[dim + i] = (size, (2, i))
    return view_axes(b, node, x, positional)


def view_axes(b, node, x, size_args: SizeArgs):
    """Map input axes to output axes by size products (see the module docstring)."""
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
    """Literal sizes must follow their axis; sizes given by nodes are settled after the walk."""
    for position, (size, slot) in enumerate(size_args):
        if position >= len(out) or size is None:
            continue
        expr = out[position]
        if isinstance(size, int):
            if size != -1 and not isinstance(expr, Const):
                b.result.literals.append(Literal(node.name, slot[0], slot[1], expr, size))
        elif isinstance(size, fx.Node) and isinstance(b.result.values.get(size.name), SizeValue):
            b.links.append(SizeLink(node.name, slot[0], slot[1], expr, b.result.values[size.name]))


# -- moving axes ---------------------------------------------------------------------------
@on_tensor("permute")
def permute(b, node, x):
    dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    dims = dims or node.kwargs.get("dims", ())
    return tuple(x[d % len(x)] for d in dims)


@on_tensor("transpose")
def transpose(b, node, x):
    d0, d1 = node.args[1] % len(x), node.args[2] % len(x)
    out = list(x)
    out[d0], out[d1] = out[d1], out[d0]
    return tuple(out)


@on_tensor("t")
def t(b, node, x):
    return tuple(reversed(x))


@on_tensor("unsqueeze")
def unsqueeze(b, node, x):
    dim = dim_arg(node, 1, 0, len(x) + 1)
    return x[:dim] + (Const(1),) + x[dim:]


@on_tensor("squeeze")
def squeeze(b, node, x):
    kept = [a for a, s in zip(x, b.shapes[node.args[0]].shape) if s != 1]
    if len(kept) == len(b.shapes[node].shape):
        return tuple(kept)
    return view_axes(b, node, x, None)


@on_tensor("expand")
def expand(b, node, x):
    """expand(x, sizes): kept axes pass (their literal sizes follow them), expanded ones are new."""
    out_shape, in_shape = b.shapes[node].shape, b.shapes[node.args[0]].shape
    lead = len(out_shape) - len(x)
    out = [b.axes.new(d, node.name, "expanded") for d in out_shape[:lead]]
    for axis, (expr, size) in enumerate(zip(x, in_shape)):
        out.append(expr if size == out_shape[lead + axis] else
                   b.axes.new(out_shape[lead + axis], node.name, "expanded"))
    args = node.args[1:]
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        _link_sizes(b, node, out, [(size, (1, i)) for i, size in enumerate(args[0])])
    elif all(isinstance(a, (int, fx.Node)) for a in args) and len(args) == len(out):
        _link_sizes(b, node, out, [(size, (1 + i, None)) for i, size in enumerate(args)])
    return tuple(out)


@on_tensor("repeat")
def repeat(b, node, x):
    """x.repeat(sizes): axes repeated once pass; a size-1 axis repeated is new (a broadcast, as in
    expand: SigLIP's ``probe.repeat(batch, 1, 1)``); any other repeated axis is pinned."""
    args = node.args[1:]
    sizes = list(args[0]) if len(args) == 1 and isinstance(args[0], (list, tuple)) else list(args)
    out_shape, in_shape = b.shapes[node].shape, b.shapes[node.args[0]].shape
    lead = len(out_shape) - len(x)
    if len(sizes) != len(out_shape) or lead < 0:
        return b.opaque(node, "repeat with sizes it cannot read")
    out = [b.axes.new(d, node.name, "repeated") for d in out_shape[:lead]]
    for axis, (expr, size) in enumerate(zip(x, in_shape)):
        if sizes[lead + axis] == 1:
            out.append(expr)
            continue
        if size != 1:
            b.axes.pin(expr, f"repeated at {node.name}")
        out.append(b.axes.new(out_shape[lead + axis], node.name, "repeated"))
    return tuple(out)


@on_tensor("repeat_interleave")
def repeat_interleave(b, node, x):
    """x.repeat_interleave(n, dim) with a literal n: that axis is n times its input (Mamba-2's
    B and C from groups to heads); the others pass. A tensor of counts or no dim: no rule."""
    repeats = node.args[1] if len(node.args) > 1 else node.kwargs.get("repeats")
    dim = dim_arg(node, 2, None, len(x))
    if not isinstance(repeats, int) or not isinstance(dim, int):
        return b.opaque(node, "repeat_interleave by a tensor of counts or over a flattened input")
    if repeats == 1:
        return x
    axis = x[dim]
    grown = Const(axis.value * repeats) if isinstance(axis, Const) else Prod((axis, Const(repeats)))
    return x[:dim] + (grown,) + x[dim + 1:]


@on_tensor("select")
def select(b, node, x):
    dim = dim_arg(node, 1, 0, len(x))
    return x[:dim] + x[dim + 1:]


@on_tensor("slice")
def slice_rule(b, node, x):
    """slice/narrow along one axis: the whole axis passes, a part of it pins it."""
    dim = dim_arg(node, 1, 0, len(x))
    in_size, out_size = b.shapes[node.args[0]].shape[dim], b.shapes[node].shape[dim]
    if in_size == out_size:
        return x
    part = b.axes.new(out_size, node.name, _slice_reason(b, x[dim]))
    b.sliced(x[dim], part, node)
    return x[:dim] + (part,) + x[dim + 1:]


def _slice_reason(b, axis: Expr) -> str:
    """Why a part of ``axis`` keeps its size: why the axis itself does, when something fixed it
    before the slice (a size created in the graph: a timestep embedding's frequencies), else "slice"."""
    roots = [b.axes.root(s) for s in symbols(axis)]
    if roots and b.axes.fixed(axis):
        return next((b.axes.pinned[r] for r in roots if r in b.axes.pinned), "slice")
    return "slice"


@on_tensor("pad")
def pad(b, node, x):
    """F.pad(x, (left, right, ...)): a padded axis is pinned, the others pass."""
    widths = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad", ())
    out_shape, out = b.shapes[node].shape, list(x)
    for k in range(len(widths) // 2):
        axis = len(x) - 1 - k
        if widths[2 * k] != 0 or widths[2 * k + 1] != 0:
            b.axes.pin(x[axis], f"padded at {node.name}")
            out[axis] = b.axes.new(out_shape[axis], node.name, "padded")
    return tuple(out)


# -- indexing --------------------------------------------------------------------------------
def getitem(b, node):
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


def index_rows(b, node):
    """x[idx] with one index tensor on one axis (Whisper's ``positions.weight[position_ids]``): the
    indexed axis becomes the index's axes, every other axis passes. Other advanced indexing has no rule."""
    x = b.axes_of(node.args[0])
    indices = node.args[1] if len(node.args) > 1 else None
    if x is None or not isinstance(indices, (list, tuple)):
        return b.opaque(node, "advanced (tensor) indexing")
    given = [i for i, t in enumerate(indices) if t is not None]
    picked = b.axes_of(indices[given[0]]) if len(given) == 1 else None
    if picked is None:
        return b.opaque(node, "advanced indexing with more than one index tensor")
    at = given[0]
    b.axes.pin(x[at], f"indexed at {node.name}")
    return x[:at] + tuple(picked) + x[at + 1:]


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
                part = b.axes.new(spec.shape[len(out)], f"{node.name}", _slice_reason(b, axis))
                b.sliced(axis, part, node)
                out.append(part)
            position += 1
    out.extend(x[position:])
    return tuple(out)


def topk(b, node):
    """topk(x, k, dim): the axis chosen from keeps its size (a MoE router's experts: widening
    it would add experts); the other axes pass through to the values and the indices."""
    x = b.axes_of(node.args[0]) if node.args else None
    value = b.shapes.value(node)
    if x is None or not isinstance(value, (tuple, list)) or not isinstance(value[0], TensorSpec):
        return b.opaque(node, "top-k of a non-tensor")
    dim = dim_arg(node, 2, -1, len(x))
    if not isinstance(dim, int):
        return b.opaque(node, "top-k over a computed dim")
    dim %= len(x)
    b.axes.pin(x[dim], f"top-k choice at {node.name}: the entries chosen from keep their count")
    kept = b.axes.new(value[0].shape[dim], f"{node.name}.k", "top-k choice: k is fixed")
    out = x[:dim] + (kept,) + x[dim + 1:]
    return tuple(out for _ in value)
