"""Shared machinery of the layer-local rewrites (Sparse Parallel, Factorized, Doped).

`LayerRewritePass` walks the layers that `LayerAnalysis` marks transformable and asks the
subclass for a replacement module per layer (``build``); shortcut projections are only masked
(same shape, sparse at s'), as the paper does. Every new node carries ``sift.origin`` (the
original layer's name) and ``sift.rule`` (the pass), so reports and exporters can trace it back.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Tuple

import torch.nn as nn

from ..analyses.layers import LayerAnalysis, WeightLayer
from ..analyses.shapes import ShapeAnalysis
from ..config import CompileConfig
from ..errors import PassError, at_node
from ..initialization import mark_copy
from ..sparsity.layers import deferred_init, masked_copy, new_layer
from ..unit import LayerDecision, ModuleRewrite
from .base import Pass, PassResult
from .graph_edit import finish_edits, splice_module

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


@dataclass(frozen=True)
class RewriteOptions:
    """What a rewrite pass needs from the `CompileConfig`, frozen (passes never read it globally).

    ``activation``/``linear_norm``: sigma after sparse Linears (`sigma`); ``seed``: the streams of
    tensors a rewrite redraws itself (Sparse Wide's parameters read by the graph);
    ``kernel_head_dims``: Sparse Wide rounds widened attention head dims to sizes attention
    kernels accept (`sparse_wide.kernel_head_dim`).
    """

    sparsity: float
    capacity: Optional[float] = None
    round_to: int = 1
    defer_init: bool = True
    activation: str = "auto"
    linear_norm: bool = False
    seed: int = 0
    kernel_head_dims: bool = False  # Sparse Wide: head dims that attention kernels accept

    @staticmethod
    def of(config: CompileConfig) -> "RewriteOptions":
        return RewriteOptions(config.sparsity, config.capacity, config.channel_multiple, activation=config.activation,
                              linear_norm=config.linear_norm, seed=config.seed,
                              kernel_head_dims=config.kernel_head_dims)


def sigma(layer: nn.Module, width: int, activation: str, linear_norm: bool) -> Tuple[Optional[nn.Module], nn.Module]:
    """(norm, activation) placed after a sparse factor of ``width`` outputs.

    Convs: BatchNorm + ReLU (paper). Linears: the model's own activation, LayerNorm optional.
    """
    factory = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    if isinstance(layer, nn.modules.conv._ConvNd):
        norm_cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[len(layer.kernel_size)]
        return norm_cls(width, **factory), nn.ReLU()
    norm = nn.LayerNorm(width, **factory) if linear_norm else None
    return norm, ACTIVATIONS[activation]()


def model_activation(unit, chosen: str) -> str:
    """The activation for sigma after linears: ``chosen``, or the model's own when it is "auto"."""
    return unit.analyses.get(LayerAnalysis).activation if chosen == "auto" else chosen


def fan(layer: nn.Module) -> Tuple[int, int, int, int]:
    """(D_in, D_out, kernel elements, groups) of a Linear or Conv."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features, 1, 1
    kernel = 1
    for k in layer.kernel_size:
        kernel *= k
    return layer.in_channels, layer.out_channels, kernel, layer.groups


# What code around a layer reads from it (Whisper's encoder: conv2.stride; T5's feed-forward:
# wo.weight.dtype): a replacement answers as the layer it stands in for.
LAYER_ATTRIBUTES = ("in_features", "out_features", "in_channels", "out_channels", "kernel_size", "stride",
                    "padding", "dilation", "groups", "padding_mode", "transposed", "output_padding")


class LayerStandIn:
    """Mixin of the modules that replace a Linear/Conv: they keep its size and stride attributes
    (`stand_in_for`), and ``weight`` is their first weight, for code that reads the layer's dtype
    or device (its shape is that factor's, not the original layer's)."""

    @property
    def weight(self):
        return next(p for name, p in self.named_parameters() if name.endswith("weight") and p.is_floating_point())


def stand_in_for(replacement: nn.Module, layer: nn.Module) -> nn.Module:
    """Copy ``layer``'s size and stride attributes onto the module that replaces it."""
    for name in LAYER_ATTRIBUTES:
        if hasattr(layer, name) and not hasattr(replacement, name):
            setattr(replacement, name, getattr(layer, name))
    return replacement


def low_rank_pair(layer: nn.Module, width: int, masked: bool, v_bias: bool = True) -> Tuple[nn.Module, nn.Module]:
    """(U, V) with ``layer``'s shape through a ``width``-wide middle: U keeps the layer's kernel,
    stride, padding and groups (no bias); V is a Linear, or a 1x1 conv, from ``width`` to the
    layer's outputs (its bias as the layer's, unless ``v_bias`` is False). U first: the draw order."""
    no_bias = {} if v_bias else {"bias": False}
    if isinstance(layer, nn.Linear):
        u = new_layer(layer, masked=masked, out_features=width, bias=False)
        return u, new_layer(layer, masked=masked, in_features=width, **no_bias)
    ones = (1,) * len(layer.kernel_size)
    u = new_layer(layer, masked=masked, out_channels=width, bias=False)
    return u, new_layer(layer, masked=masked, in_channels=width, kernel_size=ones, stride=ones, padding=0,
                        dilation=ones, padding_mode="zeros", **no_bias)


def round_to_multiple(value: float, multiple: int, minimum: int = 0) -> int:
    """Nearest multiple of ``multiple`` (at least ``minimum``)."""
    return max(minimum, int(round(value / multiple)) * multiple)


def ensure_output_shapes(unit) -> None:
    """The postcondition of every rewrite: the graph still propagates shapes, to the dense model's outputs."""
    outputs = unit.analyses.get(ShapeAnalysis).outputs(unit.module)
    if unit.baseline_outputs is not None and outputs != unit.baseline_outputs:
        raise PassError(f"output shapes changed from {unit.baseline_outputs} to {outputs}")


class LayerRewritePass(Pass):
    """Base of the layer-local Sparse-IFT rewrites; subclasses implement ``build``."""

    transform = "none"
    export_forms = False  # True: the layers it makes have export forms (exporters.forms; TransformSpec)

    def __init__(self, sparsity: float, defer_init: bool = False, capacity: Optional[float] = None,
                 options: Optional[RewriteOptions] = None) -> None:
        self.sparsity = sparsity
        # the transform's size instead of its iso-FLOP formula (CompileConfig.capacity: unit per transform)
        self.capacity = capacity
        # leave the new sparse weights to InitMasksPass, which draws and masks them in one go
        self.defer_init = defer_init
        # sigma's activation and LayerNorm; None: RewriteOptions' defaults (the model's own activation, no norm)
        self.options = RewriteOptions(sparsity, capacity, defer_init=defer_init) if options is None else options

    def sigma_for(self, unit, layer: nn.Module, width: int) -> Tuple[Optional[nn.Module], nn.Module]:
        """(norm, activation) after a sparse factor of ``width`` outputs, as the options ask (`sigma`)."""
        return sigma(layer, width, model_activation(unit, self.options.activation), self.options.linear_norm)

    def build(self, unit, layer: WeightLayer, module: nn.Module) -> Tuple[nn.Module, str]:
        """Return (replacement module computing the transformed layer, a short detail string)."""
        raise NotImplementedError

    def call(self, unit) -> PassResult:
        table = unit.analyses.get(LayerAnalysis)
        nodes = {n.name: n for n in unit.module.graph.nodes}
        with deferred_init() if self.defer_init else contextlib.nullcontext():
            modified = self._rewrite_layers(unit, table, nodes)
        if modified:
            finish_edits(unit)
        return PassResult(modified)

    def ensures(self, unit) -> None:
        ensure_output_shapes(unit)

    def _rewrite_layers(self, unit, table: LayerAnalysis, nodes) -> bool:
        gm = unit.module
        modified = False
        for layer in table.transformable(self.transform):
            try:
                module = gm.get_submodule(layer.target)
                meta = {"sift.origin": layer.target, "sift.rule": self.name}
                if layer.shortcut:
                    replacement, detail, kind = mark_copy(masked_copy(module), layer.target), \
                        "shortcut projection: masked, not copied", "masked"
                    replacement.target_density = 1.0 - self.sparsity
                else:
                    replacement, detail = self.build(unit, layer, module)
                    stand_in_for(replacement, module)
                    kind = self.transform
                unit.rewrites.modules.append(ModuleRewrite.of(layer.target, module, replacement, nodes[layer.nodes[0]]))
                for node_name in layer.nodes:
                    splice_module(unit, nodes[node_name], replacement, layer.target, meta)
                unit.decisions[layer.target] = LayerDecision(kind, detail)
                modified = True
            except Exception as e:  # the pass manager names this layer's node and source line
                raise at_node(e, nodes[layer.nodes[0]])
        return modified
