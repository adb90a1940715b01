"""Graph surgery shared by the rewrite passes.

``splice_module(unit, node, module, path)`` replaces one `call_module` node with the graph of
``module``'s forward: ``module`` is registered at ``path`` (usually the replaced layer's own
name, so parameters read ``layer1.0.conv1.branches.2.layer.weight``), traced with the capture's
tracer, and its nodes are copied in place of ``node``. Passes therefore build replacements as
plain, readable ``nn.Module``s, and analyses only ever see primitive layers.
"""
from __future__ import annotations

from typing import Any, Dict

import torch.fx as fx
import torch.nn as nn

from ..capture.experts import ROUTED
from ..module_tools import submodule_or_none
from ..capture.tracer import SiftTracer


def splice_module(unit, node: fx.Node, module: nn.Module, path: str, meta: Dict[str, Any]) -> fx.Node:
    """Replace ``node`` (a single-input `call_module`) with ``module``'s traced graph; returns the output node."""
    gm = unit.module
    if not _registered(gm, path, module):
        gm.add_submodule(path, module)
    if SiftTracer().is_leaf_module(module, path):  # one primitive layer: just retarget the node
        node.target = path
        node.meta.update(meta)
        node.meta["sift.role"] = ""
        return node
    sub_graph = _traced(module)
    env: Dict[fx.Node, Any] = {}
    inputs = list(node.args)
    result = None
    with gm.graph.inserting_before(node):
        for sub_node in sub_graph.nodes:
            if sub_node.op == "placeholder":
                env[sub_node] = inputs.pop(0) if inputs else sub_node.args[0]
            elif sub_node.op == "output":
                result = fx.map_arg(sub_node.args[0], lambda n: env[n])
            else:
                new = gm.graph.node_copy(sub_node, lambda n: env[n])
                if new.op in ("call_module", "get_attr"):
                    new.target = f"{path}.{sub_node.target}"
                new.meta.update(meta)
                for key in ("stack_trace", ROUTED):  # where it came from; what share of tokens it sees
                    if key in node.meta:
                        new.meta[key] = node.meta[key]
                if new.op == "call_module":
                    new.meta["sift.role"] = str(sub_node.target)
                env[sub_node] = new
    node.replace_all_uses_with(result)
    gm.graph.erase_node(node)
    return result


_TRACES: Dict[Any, fx.Graph] = {}


def _traced(module: nn.Module) -> fx.Graph:
    """The graph of ``module``'s forward (a Graph only: no GraphModule code generation per layer).
    Modules whose forward depends only on their submodules' names and types (``traced_by_structure``,
    as the rewrites' replacement modules) are traced once per structure: ResNet-50 has 16 alike."""
    if not getattr(type(module), "traced_by_structure", False):
        return SiftTracer().trace(module)
    key = (type(module), module.training,
           tuple((name, type(sub)) for name, sub in module.named_modules(remove_duplicate=False)))
    if key not in _TRACES:
        _TRACES[key] = SiftTracer().trace(module)
    return _TRACES[key]


def _registered(gm: fx.GraphModule, path: str, module: nn.Module) -> bool:
    return submodule_or_none(gm, path) is module


def finish_edits(unit) -> None:
    """Lint, recompile, drop modules no node uses any more, and mark analyses stale."""
    gm = unit.module
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    unit.touch()
