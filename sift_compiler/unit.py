"""The `CompilationUnit`: what every pass works on.

It holds the GraphModule, the example inputs, the config, the analysis cache, a generation
counter that every edit bumps (graph or masks), the names of the passes that ran, the
per-layer decisions the report shows, and the rewrite log: every module, tensor and literal a
pass replaced, which `native` replays on the user's own model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.fx._pytree as fx_pytree
import torch.utils._pytree as pytree

from .analyses.manager import AnalysisManager
from .config import CompileConfig


@dataclass
class LayerDecision:
    """What a pass did to one original weight layer, for the report."""

    transform: str                  # "kept", "parallel", "factorized", "doped", "wide", "masked"
    detail: str = ""                # "4 branches", "h=230", ...
    notes: List[str] = field(default_factory=list)


@dataclass
class ModuleRewrite:
    """The module at ``path`` (``old``, as the graph called it) was replaced by ``new``.

    ``owner`` is the model's module whose forward made the call (it differs from ``path`` when
    capture turned a functional call into a module: timm's BatchNormAct2d calls F.batch_norm);
    ``location`` is the user's source line of (one of) its calls.
    """

    path: str
    old: nn.Module
    new: nn.Module
    location: str = ""
    owner: str = ""

    @staticmethod
    def of(path: str, old: nn.Module, new: nn.Module, call: Optional[fx.Node]) -> "ModuleRewrite":
        """The rewrite of the module ``call`` (a call_module node, if any) called."""
        from .errors import source_location
        if call is None:
            return ModuleRewrite(path, old, new)
        stack = call.meta.get("nn_module_stack") or {}
        owner = list(stack.values())[-1][0] if stack else path
        return ModuleRewrite(path, old, new, source_location(call) or "", owner)


@dataclass
class TensorRewrite:
    """The parameter or buffer read at ``target`` (a get_attr) was replaced by ``new``."""

    target: str
    old: torch.Tensor
    new: torch.Tensor


@dataclass
class LiteralRewrite:
    """A constant argument of graph node ``node`` changed from ``old`` to ``new`` (a size, a scale).

    ``owners`` are the module paths whose forward computed the node, innermost last; ``location``
    is the user's source line.
    """

    node: str
    old: Union[int, float]
    new: Union[int, float]
    owners: Tuple[str, ...] = ()
    location: str = ""


@dataclass
class RewriteLog:
    """What the passes replaced, in order; `native.build_native` replays it on the user's model."""

    modules: List[ModuleRewrite] = field(default_factory=list)
    tensors: List[TensorRewrite] = field(default_factory=list)
    literals: List[LiteralRewrite] = field(default_factory=list)

    def literal(self, node: fx.Node, old: Union[int, float], new: Union[int, float]) -> None:
        from .errors import source_location
        stack = node.meta.get("nn_module_stack") or {}
        self.literals.append(LiteralRewrite(node.name, old, new, tuple(path for path, _ in stack.values()),
                                            source_location(node) or ""))


class CompilationUnit:
    """A graph module plus everything passes share about it."""

    def __init__(self, module: fx.GraphModule, args: Tuple[Any, ...] = (), kwargs: Optional[Dict[str, Any]] = None,
                 config: Optional[CompileConfig] = None) -> None:
        self.module = module
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.config = config or CompileConfig()
        self.generation = 0
        self.analyses = AnalysisManager(self)
        self.history: List[str] = []
        self.decisions: Dict[str, LayerDecision] = {}
        self.notes: List[str] = []
        self.effective_sparsity: Optional[float] = None
        self.baseline = None  # FlopCounts of the graph before any pass (the iso-FLOP target)
        self.baseline_outputs = None  # output TensorSpecs before any pass
        self.baseline_layers = None   # LayerTable before any pass
        self.rewrites = RewriteLog()
        self.init_policy = None  # how new modules are initialised (`initialization.init_policy_for`)

    @property
    def graph(self) -> fx.Graph:
        return self.module.graph

    @property
    def on_meta(self) -> bool:
        """The weights are on the meta device: shapes only, a compile that plans (`initialization.materialize`)."""
        return on_meta_device(self.module)

    def touch(self) -> None:
        """Record that the graph or the masks changed: cached analyses become stale."""
        self.generation += 1

    def flat_inputs(self) -> List[Any]:
        """The example inputs in the order of the graph's placeholders."""
        return bind_placeholders(self.module, self.args, self.kwargs)

    @property
    def batch_size(self) -> int:
        first = next((t for t in pytree.tree_leaves((self.args, self.kwargs)) if isinstance(t, torch.Tensor)), None)
        return int(first.shape[0]) if first is not None and first.dim() > 0 else 1


def on_meta_device(module: nn.Module) -> bool:
    """Does ``module`` hold any parameter or buffer on the meta device?"""
    return any(t.is_meta for t in list(module.parameters()) + list(module.buffers()))


def bind_placeholders(gm: fx.GraphModule, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> List[Any]:
    """Map (args, kwargs) onto the placeholder nodes of ``gm`` (fx or torch.export graphs)."""
    codegen = gm.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is not None and info.in_spec is not None:
        return list(fx_pytree.tree_flatten_spec((args, kwargs), info.in_spec))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values, positional = [], list(args)
    for node in placeholders:
        name = str(node.target).lstrip("*")
        if name in kwargs:
            values.append(kwargs[name])
        elif positional:
            values.append(positional.pop(0))
        elif node.args:
            values.append(node.args[0])
        else:
            values.append(None)
    return values
