"""Sparse Doped Linear layers as ONE matmul over ``[x, U x]``: the form DeepSparse 1.8 compiles.

A Doped Linear computes ``y = M x + V (U x)`` (M sparse, U and V dense). Exported as trained, two
layers read ``x`` (a Gemm with M, a MatMul with U) and their results are added; DeepSparse 1.8's
compiler aborts on that graph (``Assertion at ./src/include/wand/engine/compute/planner.hpp:70``,
tests/data/deepsparse_abort.onnx: 3.6 KB, found on torchvision's mobilenet_v3_small). The same
function written as one layer over a concatenation compiles and agrees with onnxruntime::

    x -+-> M (sparse) ----------+-> add   ==>   x -+-----------+-> concat -> [M | V] (M part sparse) -> y
       +-> U (dense) -> V ------+                  +-> U x ----+

The products are the same (only the order of the sum changes), FLOPs are the same, and the
combined layer keeps M's zeros (its mask is M's mask next to ones for V). Convolutions are left
as trained: their Doped form compiles.
"""
from __future__ import annotations

import copy
import operator
from typing import List, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from ..sparsity.layers import MaskedLayer, new_layer

DOPED_RULE = "sparse-doped"


class ConcatDopedLinear(nn.Module):
    """``[M | V] [x, U x]``: a Doped Linear as one (partly sparse) layer."""

    def __init__(self, m: nn.Linear, u: nn.Linear, v: nn.Linear) -> None:
        super().__init__()
        self.u = u
        self.layer = new_layer(m, masked=True, in_features=m.in_features + u.out_features)
        with torch.no_grad():
            self.layer.weight.copy_(torch.cat([m.weight, v.weight], dim=1))
            mask = m.weight_mask if isinstance(m, MaskedLayer) else torch.ones_like(m.weight, dtype=torch.bool)
            self.layer.weight_mask.copy_(torch.cat([mask, torch.ones_like(v.weight, dtype=torch.bool)], dim=1))
            if m.bias is not None:
                self.layer.bias.copy_(m.bias)
        m_numel, v_numel = m.weight.numel(), v.weight.numel()
        density = float(getattr(m, "target_density", 1.0))
        self.layer.target_density = (density * m_numel + v_numel) / (m_numel + v_numel)

    def forward(self, x):
        return self.layer(torch.cat([x, self.u(x)], dim=-1))


def _doped_sites(gm: fx.GraphModule) -> List[Tuple[str, fx.Node, fx.Node, fx.Node, fx.Node]]:
    """(origin, m, u, v, add) of every Doped Linear call site."""
    sites = []
    for add in gm.graph.nodes:
        if not (add.op == "call_function" and add.target in (operator.add, torch.add)
                and add.meta.get("sift.rule") == DOPED_RULE and len(add.args) == 2):
            continue
        roles = {str(n.meta.get("sift.role")): n for n in add.args if isinstance(n, fx.Node)}
        m, v = roles.get("m"), roles.get("v")
        if m is None or v is None or v.op != "call_module":
            continue
        u = v.args[0]
        if not (isinstance(u, fx.Node) and u.meta.get("sift.role") == "u" and u.args[0] is m.args[0]
                and len(u.users) == 1 and len(v.users) == 1 and len(m.users) == 1):
            continue
        if isinstance(gm.get_submodule(str(m.target)), nn.Linear):
            sites.append((str(add.meta.get("sift.origin")), m, u, v, add))
    return sites


def count_doped_linears(gm: fx.GraphModule) -> int:
    """How many Doped Linear call sites `concat_doped_linears` would rewrite."""
    return len(_doped_sites(gm))


def concat_doped_linears(gm: fx.GraphModule) -> Tuple[fx.GraphModule, List[str]]:
    """A copy of ``gm`` with every Doped Linear as `ConcatDopedLinear`; returns it and the layers rewritten."""
    gm = copy.deepcopy(gm)
    done = []
    for origin, m, u, v, add in _doped_sites(gm):
        module = ConcatDopedLinear(*(gm.get_submodule(str(n.target)) for n in (m, u, v))).eval()
        path = f"{origin}.concat"
        gm.add_submodule(path, module)
        with gm.graph.inserting_before(add):
            node = gm.graph.call_module(path, (m.args[0],))
        node.meta.update({"sift.origin": origin, "sift.rule": DOPED_RULE, "sift.role": "concat"})
        add.replace_all_uses_with(node)
        for old in (add, v, u, m):
            gm.graph.erase_node(old)
        done.append(origin)
    if done:
        gm.graph.lint()
        gm.recompile()
        gm.delete_all_unused_submodules()
    return gm, done
