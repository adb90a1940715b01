"""In-place writes into slices, rewritten out of place before the TorchScript exporter sees them.

A torch.export graph keeps ``aten.copy_(aten.slice(base, dim, start, end), src)`` as written
(DeepSeek-V3's latent attention fills a ``new_empty`` key tensor this way, its no-RoPE part, then
its RoPE part). The TorchScript ONNX exporter drops such writes into a view: the file then reads
uninitialised memory. Each write becomes the value it leaves behind,

    base' = cat([base[:start], src broadcast to the slice, base[end:]], dim)

and every later reader of ``base`` reads ``base'``. A write is left alone (and named) where the
rewrite could change what the graph computes: a base that is itself a view or an input, another
view of the base read after the write, a step other than 1, or a write whose result is read.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
import torch.fx as fx

from ..errors import describe_node

_COPY = torch.ops.aten.copy_.default
_SLICE = torch.ops.aten.slice.Tensor
_END = 2 ** 63 - 1  # what torch.export writes for an open end (``x[..., 16:]``)


@dataclass
class SliceWrites:
    """What `rewrite_slice_writes` did: writes rewritten, and those it left (with why)."""

    rewritten: int = 0
    left: List[str] = field(default_factory=list)


def _aliases(node: fx.Node) -> bool:
    """Does ``node``'s value share storage with an input (a view, or an in-place op)?"""
    schema = getattr(node.target, "_schema", None)
    return schema is not None and any(r.alias_info is not None for r in schema.returns)


def _why_not(node: fx.Node, order: dict) -> str:
    """Why the write ``node`` cannot be rewritten, or "" when it can."""
    dest, src = node.args[0], node.args[1]
    if node.users:
        return "its result is read"
    if not (isinstance(dest, fx.Node) and dest.op == "call_function" and dest.target is _SLICE):
        return "it writes into a view other than one slice"
    base, step = dest.args[0], (dest.args[4] if len(dest.args) > 4 else 1)
    if step != 1 or not isinstance(src, fx.Node):
        return "a strided slice or a constant source"
    if base.op != "call_function" or _aliases(base):
        return "its base is an input, a parameter or a view"
    for reader in base.users:
        if reader is dest or order[reader] > order[node] or not _aliases(reader):
            continue
        if any(order[user] > order[node] for user in reader.users):
            return f"another view of its base ({reader.name}) is read after the write"
    return ""


def rewrite_slice_writes(gm: fx.GraphModule) -> SliceWrites:
    """Rewrite ``gm``'s in-place slice writes out of place, in place on ``gm`` (module docstring)."""
    done = SliceWrites()
    for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is _COPY]:
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        why = _why_not(node, order)
        if why:
            done.left.append(f"{describe_node(node)}: {why}")
            continue
        dest, src = node.args[0], node.args[1]
        base, dim = dest.args[0], dest.args[1] if len(dest.args) > 1 else 0
        start = dest.args[2] if len(dest.args) > 2 and dest.args[2] is not None else 0
        end = dest.args[3] if len(dest.args) > 3 and dest.args[3] is not None else _END
        later = [user for user in base.users if order[user] > order[node]]
        graph = gm.graph
        with graph.inserting_before(node):
            value = graph.call_method("type_as", (graph.call_method("expand_as", (src, dest)), dest))
            before = graph.call_function(_SLICE, (base, dim, 0, start))
            after = graph.call_function(_SLICE, (base, dim, end, _END))
            written = graph.call_function(torch.ops.aten.cat.default, ([before, value, after], dim))
        for user in later:
            user.replace_input_with(base, written)
        graph.erase_node(node)
        if not dest.users:
            graph.erase_node(dest)
        done.rewritten += 1
    if done.rewritten:
        gm.recompile()
    return done
