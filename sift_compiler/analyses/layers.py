"""LayerAnalysis: the weight layers of a graph and whether a transform may change them.

The first and last weight layers are found from the data flow: a layer is *first* when no other
weight layer (Linear, Conv or Embedding) lies on any path from the inputs to it, and *last* when
none lies on any path from it to an output. Names and shapes play no part (the reference's
"has num_classes channels" rule would silently keep any such layer dense).

Each layer also gets: depthwise (``groups == in == out channels``), grouped, a shortcut
projection (a layer on the skip path of a residual add: its input also reaches the add's other
operand), shared (called from several nodes), a match against ``--keep-dense`` patterns, and
whether it is the router of a mixture of experts (its output reaches a top-k: kept dense).
"""
from __future__ import annotations

import fnmatch
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Set, Tuple

import torch.fx as fx
import torch.nn as nn

from ..registry import get_transform, transform_names
from .manager import Analysis
from .ops import ACTIVATION_KINDS, op_kind

TRANSPARENT = frozenset({"batch_norm", "identity", "dropout"})


def _widens(transform: str) -> bool:
    """Does ``transform`` widen layers (its registry entry says so)? An unregistered name does not."""
    return transform in transform_names() and get_transform(transform).widens


@dataclass(frozen=True)
class WeightLayer:
    """One weight module of the graph (one entry even if it is called from several nodes)."""

    target: str
    kind: str                      # "linear", "conv", "conv_transpose", "embedding"
    describe: str                  # "conv2d 3x3 64->128 /2"
    nodes: Tuple[str, ...]
    weight_shape: Tuple[int, ...] = ()
    first: bool = False
    last: bool = False
    depthwise: bool = False
    grouped: bool = False
    shortcut: bool = False
    keep_pattern: Optional[str] = None
    router: bool = False

    @property
    def shared(self) -> bool:
        return len(self.nodes) > 1

    def dense_reason(self, transform: str) -> Optional[str]:
        """Why ``transform`` leaves this layer dense and unchanged; None if it may change it."""
        if self.kind == "embedding":
            return "embedding (not a Linear/Conv)"
        if self.kind not in ("linear", "conv"):
            return f"{self.kind}: not supported by Sparse-IFT transforms"
        if transform == "none":
            return "dense baseline"
        if self.router:
            return ("router of a mixture of experts: its outputs choose each token's experts (top-k), "
                    "so it stays dense and keeps the expert count")
        if self.first:
            return "first weight layer in the data flow (stem/embedding side)"
        if self.last:
            return "last weight layer in the data flow (head)"
        if self.keep_pattern is not None:
            return f"matches --keep-dense {self.keep_pattern!r}"
        if self.depthwise:
            return ("depthwise conv: widened with its group, kept dense" if _widens(transform)
                    else "depthwise conv: kept dense (paper A.1.1)")
        return None


@dataclass(frozen=True)
class LayerTable:
    layers: Dict[str, WeightLayer]   # by module target
    activation: str                  # the model's own activation for sigma after linears

    def transformable(self, transform: str) -> List[WeightLayer]:
        return [layer for layer in self.layers.values() if layer.dense_reason(transform) is None]


def _describe(module: nn.Module) -> Tuple[str, str]:
    if isinstance(module, nn.Linear):
        return "linear", f"linear {module.in_features}->{module.out_features}"
    if isinstance(module, nn.modules.conv._ConvNd):
        dims = len(module.kernel_size)
        kernel = "x".join(map(str, module.kernel_size))
        extra = ""
        if any(s != 1 for s in module.stride):
            extra += f" /{module.stride[0]}"
        if module.groups > 1:
            extra += " dw" if module.groups == module.in_channels == module.out_channels else f" g{module.groups}"
        kind = "conv_transpose" if module.transposed else "conv"
        name = f"conv{'_transpose' if module.transposed else ''}{dims}d"
        return kind, f"{name} {kernel} {module.in_channels}->{module.out_channels}{extra}"
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding", f"embedding {module.num_embeddings}x{module.embedding_dim}"
    return type(module).__name__, type(module).__name__


def weight_nodes(gm: fx.GraphModule) -> List[fx.Node]:
    """call_module nodes of Linear/Conv/Embedding modules, in graph order."""
    return [n for n in gm.graph.nodes if n.op == "call_module"
            and op_kind(gm, n) in ("linear", "conv", "conv_transpose", "embedding")]


def _flow_flags(gm: fx.GraphModule, weights: Set[fx.Node]) -> Tuple[Set[fx.Node], Set[fx.Node]]:
    """(nodes with a weight layer upstream, nodes with a weight layer downstream)."""
    upstream: Set[fx.Node] = set()
    for node in gm.graph.nodes:
        if any(a in weights or a in upstream for a in node.all_input_nodes):
            upstream.add(node)
    downstream: Set[fx.Node] = set()
    for node in reversed(gm.graph.nodes):
        if any(u in weights or u in downstream for u in node.users):
            downstream.add(node)
    return upstream, downstream


def _ancestors(node: fx.Node, limit: int = 2000) -> Set[fx.Node]:
    seen: Set[fx.Node] = set()
    stack = list(node.all_input_nodes)
    while stack and len(seen) < limit:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(current.all_input_nodes)
    return seen


def _is_shortcut(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Does this layer sit on the skip path of a residual add?"""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    source, current = node.args[0], node
    while len(current.users) == 1:
        user = next(iter(current.users))
        kind = op_kind(gm, user)
        if kind in TRANSPARENT:
            current = user
            continue
        if kind == "add":
            others = [a for a in user.all_input_nodes if a is not current]
            return any(source is o or source in _ancestors(o) for o in others)
        return False
    return False


def _activation(gm: fx.GraphModule) -> str:
    counts = Counter(k for k in (op_kind(gm, n) for n in gm.graph.nodes) if k in ACTIVATION_KINDS)
    for kind, _ in counts.most_common():
        if kind in ("relu", "gelu", "silu"):
            return kind
        if kind in ("relu6", "leaky_relu", "elu"):
            return "relu"
        if kind in ("hardswish", "mish"):
            return "silu"
    has_layer_norm = any(op_kind(gm, n) in ("layer_norm", "rms_norm") for n in gm.graph.nodes)
    return "gelu" if has_layer_norm else "relu"


def _routers(gm: fx.GraphModule, weights: Set[fx.Node], depth: int = 8) -> Set[fx.Node]:
    """Weight layers whose output reaches a top-k within ``depth`` ops with no weight layer
    between: the routers of mixture-of-experts blocks (logits -> softmax/sigmoid -> top-k)."""
    found: Set[fx.Node] = set()
    for node in gm.graph.nodes:
        if op_kind(gm, node) != "topk":
            continue
        frontier, seen = [node], set()
        for _ in range(depth):
            frontier = [a for n in frontier for a in n.all_input_nodes if a not in seen]
            seen.update(frontier)
            found.update(a for a in frontier if a in weights)
            frontier = [a for a in frontier if a not in weights]
    return found


def analyze_layers(gm: fx.GraphModule, keep_dense: Tuple[str, ...] = ()) -> LayerTable:
    nodes = weight_nodes(gm)
    routers = _routers(gm, set(nodes))
    upstream, downstream = _flow_flags(gm, set(nodes))
    by_target: Dict[str, List[fx.Node]] = {}
    for node in nodes:
        by_target.setdefault(str(node.target), []).append(node)
    layers: Dict[str, WeightLayer] = {}
    for target, calls in by_target.items():
        module = gm.get_submodule(target)
        kind, text = _describe(module)
        groups = getattr(module, "groups", 1)
        depthwise = kind == "conv" and groups > 1 and groups == module.in_channels == module.out_channels
        pattern = next((p for p in keep_dense if fnmatch.fnmatchcase(target, p)
                        or fnmatch.fnmatchcase(type(module).__name__, p)), None)
        layers[target] = WeightLayer(
            target=target, kind=kind, describe=text, nodes=tuple(n.name for n in calls),
            weight_shape=tuple(module.weight.shape) if hasattr(module, "weight") else (),
            first=any(n not in upstream for n in calls), last=any(n not in downstream for n in calls),
            depthwise=depthwise, grouped=kind == "conv" and groups > 1 and not depthwise,
            shortcut=any(_is_shortcut(gm, n) for n in calls) and kind in ("conv", "linear"),
            keep_pattern=pattern, router=any(n in routers for n in calls))
    return LayerTable(layers, _activation(gm))


class LayerAnalysis(Analysis[LayerTable]):
    name = "layers"

    @classmethod
    def run(cls, unit) -> LayerTable:
        return analyze_layers(unit.module, unit.config.keep_dense)
