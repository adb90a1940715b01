"""The `CompilationUnit`: what every pass works on.

It holds the GraphModule, the example inputs, the config, the dense baseline, the analysis
cache, a generation counter that every edit bumps (graph or masks), the names of the passes that
ran, the per-layer decisions the report shows, and the rewrite log: every module, tensor and
literal a pass replaced, which `native` replays on the user's own model.

Graph edits bump the generation through `CompilationUnit.touch`. Mask edits bump it by
themselves: the generation also watches a stamp of every mask tensor (its identity and its
autograd ``_version`` counter), so an in-place edit (a training engine's update,
``load_state_dict``, `MaskedLayer.set_mask`) or a replaced mask (``install_mask``) makes every
analysis computed before it stale, without anyone calling ``touch``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.fx._pytree as fx_pytree

from .analyses.flops import FlopAnalysis, FlopCounts, routed_shares
from .analyses.layers import LayerAnalysis, LayerTable
from .analyses.manager import AnalysisManager
from .analyses.shapes import ShapeAnalysis
from .capture.modules import on_meta_device
from .compare import tensor_leaves
from .config import CompileConfig
from .errors import source_location
from .sparsity.counts import count_parameters
from .sparsity.layers import MaskedLayer


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
        stack = node.meta.get("nn_module_stack") or {}
        self.literals.append(LiteralRewrite(node.name, old, new, tuple(path for path, _ in stack.values()),
                                            source_location(node) or ""))


@dataclass(frozen=True)
class Baseline:
    """The dense model as captured, before any pass: the iso-FLOP target and what must not change."""

    flops: "FlopCounts"      # the iso-FLOP target (``weight_dense``)
    layers: "LayerTable"     # the dense weight layers (the report's rows)
    outputs: Any             # output TensorSpecs (VerifyPass: the rewrite keeps shapes and dtypes)
    parameters: Any = None   # `sparsity.counts.ParameterCount`: total and per-token active


class CompilationUnit:
    """A graph module plus everything passes share about it.

    ``record_baseline=True`` measures the dense `Baseline` now, before any pass runs (what
    `sift_compiler.compile` does); otherwise `record_baseline` can be called later.
    """

    def __init__(self, module: fx.GraphModule, args: Tuple[Any, ...] = (), kwargs: Optional[Dict[str, Any]] = None,
                 config: Optional[CompileConfig] = None, record_baseline: bool = False) -> None:
        self.module = module
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.config = config or CompileConfig()
        self._edits = 0                       # graph edits (touch) and mask edits seen so far
        self._mask_layers: Optional[list] = None  # the masked layers at graph edit ``_mask_layers_at``
        self._mask_layers_at = -1
        self._mask_stamp: Optional[int] = None
        self.analyses = AnalysisManager(self)
        self.history: List[str] = []
        self.decisions: Dict[str, LayerDecision] = {}
        self.notes: List[str] = []
        self.effective_sparsity: Optional[float] = None
        self.dense_baseline: Optional[Baseline] = None
        self.rewrites = RewriteLog()
        self.init_policy = None  # how new modules are initialised (`initialization.init_policy_for`)
        if record_baseline:
            self.record_baseline()

    def record_baseline(self) -> Baseline:
        """Measure the graph as it is now as the dense `Baseline` (once, before any pass)."""
        self.dense_baseline = Baseline(self.analyses.get(FlopAnalysis), self.analyses.get(LayerAnalysis),
                                       self.analyses.get(ShapeAnalysis).outputs(self.module),
                                       count_parameters(self.module, routed_shares(self.module)))
        return self.dense_baseline

    @property
    def baseline(self) -> Optional["FlopCounts"]:
        """FLOPs of the graph before any pass (the iso-FLOP target), or None before `record_baseline`."""
        return self.dense_baseline.flops if self.dense_baseline is not None else None

    @property
    def baseline_layers(self) -> Optional["LayerTable"]:
        """The dense weight layers before any pass."""
        return self.dense_baseline.layers if self.dense_baseline is not None else None

    @property
    def baseline_outputs(self) -> Any:
        """Output TensorSpecs before any pass."""
        return self.dense_baseline.outputs if self.dense_baseline is not None else None

    @property
    def generation(self) -> int:
        """A counter that grows with every edit of the graph (`touch`) or of any mask tensor.

        Analyses are stamped with it; one read at another generation is recomputed.
        """
        stamp = self._masks_stamp()
        if stamp != self._mask_stamp:
            if self._mask_stamp is not None:
                self._edits += 1
            self._mask_stamp = stamp
        return self._edits

    def _masks_stamp(self) -> int:
        # the layer list only changes with the graph (passes touch() when they splice modules), so
        # it is cached per graph edit; the stamp itself reads each mask's identity and version
        if self._mask_layers is None or self._mask_layers_at != self._edits:
            self._mask_layers = [m for m in self.module.modules() if isinstance(m, MaskedLayer)]
            self._mask_layers_at = self._edits
        return hash(tuple((id(mask), _version_of(mask)) for mask in
                          (getattr(layer, "weight_mask", None) for layer in self._mask_layers)))

    @property
    def graph(self) -> fx.Graph:
        return self.module.graph

    @property
    def on_meta(self) -> bool:
        """The weights are on the meta device: shapes only, a compile that plans (`initialization.materialize`)."""
        return on_meta_device(self.module)

    def touch(self) -> None:
        """Record that the graph (or anything an analysis reads) changed: cached analyses become stale.

        Mask tensors need no call: the generation watches them (see the module docstring).
        """
        self._mask_stamp = None  # re-read after the edit without counting it twice
        self._edits += 1

    def flat_inputs(self) -> List[Any]:
        """The example inputs in the order of the graph's placeholders."""
        return bind_placeholders(self.module, self.args, self.kwargs)

    @property
    def batch_size(self) -> int:
        first = next(iter(tensor_leaves((self.args, self.kwargs))), None)
        return int(first.shape[0]) if first is not None and first.dim() > 0 else 1


def _version_of(tensor: Optional[torch.Tensor]) -> int:
    """The autograd version counter of ``tensor`` (bumped by every in-place edit); -1 if it has none."""
    if tensor is None:
        return -1
    try:
        return tensor._version
    except RuntimeError:  # inference tensors keep no version counter
        return -1


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
