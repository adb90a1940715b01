"""Sparse Wide: every coupled channel group k = sqrt(1 / (1 - s)) times wider, layers sparse.

A Linear/Conv widened on both sides costs k^2 (1 - s) = 1 times its dense FLOPs. Widening one
layer's outputs forces every consumer of those channels to widen its inputs, so the pass widens
*groups* from `ChannelCouplingAnalysis`, never single layers:

1. each free group gets round(k * size) channels, rounded to a multiple that keeps it valid
   (``round_to``, the groups of grouped convs and GroupNorms, and the number of attention heads for
   the residual stream that feeds q/k/v projections: the paper's Table 14 rounds d_model = 1092);
   where the nearest multiple is the group's own size (24 channels, 3 heads, round_to 8: multiples
   of 24), the next multiple up is taken, so that a widened group is wider and compensation pays;
   composed axes (cat, flatten, heads x head_dim) follow from their parts; the model's inputs and
   outputs, and groups touched by ops without a coupling rule, keep their size (see the notes);
2. every module on a widened axis is rebuilt at its new size with fresh initialisation, as its
   type initialises (a module whose sizes do not change keeps its weights, so s = 0 is the dense
   model); parameters read by the graph (class tokens, position embeddings) are redrawn with the
   original's standard deviation; literal sizes in views and splits are rewritten;
3. Linear/Conv layers become masked, except the first and last weight layers, depthwise convs
   (widened with their group, dense: their FLOPs grow by k, not k^2) and ``--keep-dense`` matches.
The global compensation then sets the sparsity s' that makes the model iso-FLOP.

::

    x -> conv(64->64) -> BN(64) -> ... ==> x -> sparse conv(91->91) -> BN(91) -> ...   (s = 0.5)
"""
from __future__ import annotations

import contextlib
import math
from collections import Counter
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from ..analyses.axes import Prod, Sum, Sym, symbols
from ..analyses.coupling import ChannelCouplingAnalysis, CouplingResult, getattr_path
from ..analyses.layers import LayerAnalysis
from ..analyses.ops import module_kind
from ..errors import PassError, at_node
from ..initialization import mark_copy, mark_fresh, stream_seed
from ..shortfall import OUTPUT_FIXES_WIDTH
from ..sparsity.layers import MaskedLayer, deferred_init, masked_copy, new_layer
from ..unit import LayerDecision, ModuleRewrite, TensorRewrite
from .base import Pass, PassResult
from .graph_edit import finish_edits
from .rewrite import RewriteOptions, ensure_output_shapes, round_to_multiple


def widening_factor(sparsity: float) -> float:
    """k = sqrt(1 / (1 - s))."""
    return math.sqrt(1.0 / (1.0 - sparsity))


def _heads(axes, expr, depth: int = 0):
    """The head count if ``expr`` is (a sum of) heads x head_dim, else None."""
    if depth > 8:
        return None
    if isinstance(expr, Sym):
        definition = axes.definition.get(axes.root(expr))
        return _heads(axes, definition, depth + 1) if definition is not None else None
    if isinstance(expr, Prod) and len(expr.factors) >= 2:
        return axes.original(expr.factors[-2])
    if isinstance(expr, Sum):
        found = [_heads(axes, term, depth + 1) for term in expr.terms]
        return next((h for h in found if h), None)
    return None


# Head sizes FlashAttention, SDPA's fused kernels and vLLM's attention backends all accept; other
# multiples of 8 up to 256 run on FlashAttention and SDPA.
KERNEL_HEAD_DIMS = (32, 64, 80, 96, 112, 120, 128, 192, 256)
KERNEL_MAX_HEAD_DIM = 256


def kernel_head_dim(target: float, multiple: int = 1) -> Optional[int]:
    """The head dim attention kernels accept nearest to ``target``: one of `KERNEL_HEAD_DIMS`
    within 12.5% of it, else the nearest multiple of 8 (and of ``multiple``) up to 256; None when
    ``multiple`` leaves no such size.

    >>> kernel_head_dim(64 * 2 ** 0.5), kernel_head_dim(16 * 2 ** 0.5), kernel_head_dim(128 * 3.16)
    (96, 24, 256)
    """
    step = math.lcm(8, multiple)
    allowed = list(range(step, KERNEL_MAX_HEAD_DIM + 1, step))
    if not allowed:
        return None
    preferred = [d for d in KERNEL_HEAD_DIMS if d % step == 0 and abs(d - target) <= 0.125 * target]
    return min(preferred or allowed, key=lambda d: (abs(d - target), d))


def _head_dim_roots(axes, expr, depth: int = 0) -> List[int]:
    """The roots of the head dims in ``expr`` (heads x head_dim, or sums of them)."""
    if depth > 8:
        return []
    if isinstance(expr, Sym):
        definition = axes.definition.get(axes.root(expr))
        return _head_dim_roots(axes, definition, depth + 1) if definition is not None else []
    if isinstance(expr, Prod) and len(expr.factors) >= 2 and isinstance(expr.factors[-1], Sym):
        return [axes.root(expr.factors[-1])]
    if isinstance(expr, Sum):
        return [r for term in expr.terms for r in _head_dim_roots(axes, term, depth + 1)]
    return []


def _heads_rule(coupling: CouplingResult) -> None:
    """The residual stream feeding q/k/v projections rounds to a multiple of the heads."""
    axes = coupling.axes
    for entry in coupling.modules.values():
        if "in" not in entry or "out" not in entry or entry.get("depthwise"):
            continue
        heads = _heads(axes, entry["out"])
        if heads and heads > 1:
            axes.require_multiple(entry["in"], heads)


class SparseWidePass(Pass):
    """Widen every coupled channel group by k and mask the widened layers (module docstring)."""

    name = "sparse-wide"
    widens = True  # channel counts change, so round_to applies (TransformSpec.widens)

    def __init__(self, sparsity: float, round_to: int = 1, defer_init: bool = False,
                 factor: Optional[float] = None, options: Optional[RewriteOptions] = None,
                 kernel_head_dims: bool = False) -> None:
        self.sparsity = sparsity
        self.kernel_head_dims = kernel_head_dims  # widened head dims rounded for attention kernels
        self.round_to = round_to
        self.factor = widening_factor(sparsity) if factor is None else factor  # k, or the capacity asked for
        self.defer_init = defer_init  # see LayerRewritePass
        # the seed of redrawn parameters; None: RewriteOptions' defaults (seed 0)
        self.options = RewriteOptions(sparsity, factor, round_to, defer_init, kernel_head_dims=kernel_head_dims) \
            if options is None else options

    def call(self, unit) -> PassResult:
        coupling = unit.analyses.get(ChannelCouplingAnalysis)
        table = unit.analyses.get(LayerAnalysis)
        _heads_rule(coupling)
        axes = coupling.axes
        head_dims = {r for entry in coupling.modules.values() if "out" in entry
                     for r in _head_dim_roots(axes, entry["out"])} if self.kernel_head_dims else set()

        def widen(root: int, size: int, multiple: int) -> int:
            multiple = math.lcm(multiple, self.round_to)
            if root in head_dims:
                size_for_kernels = kernel_head_dim(size * self.factor, multiple)
                if size_for_kernels is not None:
                    return size_for_kernels
            widened = round_to_multiple(size * self.factor, multiple, minimum=multiple)
            if self.factor > 1 and widened <= size:  # rounding must not undo the widening: next multiple up
                widened = (size // multiple + 1) * multiple
            return widened
        size_of = axes.solve(widen)
        gm = unit.module
        with deferred_init() if self.defer_init else contextlib.nullcontext():
            rebuilt = self._rebuild_modules(unit, coupling, table, size_of)
        self._rebuild_params(unit, coupling, size_of, rebuilt)
        self._rewrite_literals(unit, coupling, size_of)
        self._rescale_attention(unit, coupling, size_of)
        unit.notes.extend(self._group_notes(coupling, size_of))
        if self.kernel_head_dims:
            unit.notes.append(self._head_dim_note(axes, head_dims, size_of))
        unit.notes.extend(dict.fromkeys(coupling.notes))
        finish_edits(unit)
        return PassResult(True)

    # -- modules -------------------------------------------------------------------------
    def _rebuild_modules(self, unit, coupling, table, size_of) -> Dict[str, nn.Module]:
        gm = unit.module
        new_params: Dict[int, nn.Parameter] = {}  # id(old weight) -> new weight, keeps ties
        rebuilt: Dict[str, nn.Module] = {}
        calls = {str(n.target): n for n in gm.graph.nodes if n.op == "call_module"}
        for path, entry in coupling.modules.items():
            try:
                self._rebuild_module(unit, coupling, table, size_of, path, entry, calls.get(path), new_params,
                                     rebuilt)
            except Exception as e:  # the pass manager names the module's call and its source line
                raise at_node(e, calls[path]) if path in calls else e
        return rebuilt

    def _rebuild_module(self, unit, coupling, table, size_of, path: str, entry, call: Optional[fx.Node],
                        new_params: Dict[int, nn.Parameter], rebuilt: Dict[str, nn.Module]) -> None:
        """Resize the module at ``path`` to its groups' new sizes, keeping weights tied across modules."""
        gm = unit.module
        module = gm.get_submodule(path)
        layer = table.layers.get(path)
        replacement, detail = self._resize(module, entry, size_of, layer)
        old_weight = getattr(module, "weight", None)
        if isinstance(old_weight, nn.Parameter) and replacement is not module:
            tied = new_params.get(id(old_weight))
            if tied is not None and tied.shape == replacement.weight.shape:
                replacement.weight = tied
            else:
                new_params[id(old_weight)] = replacement.weight
        if replacement is not module:
            gm.add_submodule(path, replacement)
            rebuilt[path] = replacement
            unit.rewrites.modules.append(ModuleRewrite.of(path, module, replacement, call))
        if layer is not None and layer.kind in ("linear", "conv"):
            unit.decisions[path] = LayerDecision("wide" if _is_masked(replacement) else "kept", detail,
                                                 kept_at_width(coupling.axes, entry, first=layer.first))
            if _is_masked(replacement) and not any(n.startswith(OUTPUT_FIXES_WIDTH) for n in unit.notes) \
                    and _fixed_by_output(coupling.axes, entry):
                unit.notes.append(f"{OUTPUT_FIXES_WIDTH} (first '{path}'): a model read at its hidden width "
                                  "(no head) widens only inner sides, so its sparse layers cost less than k^2 "
                                  "times dense; compiled with its head, the hidden width widens too")

    def _resize(self, module: nn.Module, entry, size_of, layer) -> Tuple[nn.Module, str]:
        kind = module_kind(module)
        if kind in ("linear", "conv"):
            old = (module.in_features, module.out_features) if kind == "linear" else \
                (module.in_channels, module.out_channels)
            new_in, new_out = size_of(entry["in"]), size_of(entry["out"])
            sparse = layer is not None and layer.dense_reason("wide") is None
            detail = f"in {old[0]}->{new_in}, out {old[1]}->{new_out}" + ("" if sparse else ", dense")
            if (new_in, new_out) == old:
                return (mark_copy(masked_copy(module), layer.target) if sparse else module), detail
            if kind == "linear":
                return new_layer(module, masked=sparse, in_features=new_in, out_features=new_out), detail
            groups = new_in if entry.get("depthwise") else module.groups
            if new_in % groups or new_out % groups:
                raise PassError(f"widened conv {layer.target if layer else ''} {new_in}->{new_out} is not "
                                f"divisible by its {groups} groups")
            return new_layer(module, masked=sparse, in_channels=new_in, out_channels=new_out,
                             groups=groups), detail
        factory = {"device": module.weight.device if getattr(module, "weight", None) is not None else None}
        if kind in ("batch_norm", "instance_norm"):
            n = size_of(entry["features"])
            if n == module.num_features:
                return module, ""
            return _constant_init_like(module, type(module)(
                n, eps=module.eps, momentum=module.momentum, affine=module.affine,
                track_running_stats=module.track_running_stats, **factory).train(module.training)), ""
        if kind == "group_norm":
            n = size_of(entry["features"])
            return (module, "") if n == module.num_channels else (_constant_init_like(module, nn.GroupNorm(
                module.num_groups, n, eps=module.eps, affine=module.affine, **factory)), "")
        if kind in ("layer_norm", "rms_norm"):
            shape = tuple(size_of(e) for e in entry["shape"])
            if shape == tuple(module.normalized_shape):
                return module, ""
            if kind == "rms_norm":
                return _constant_init_like(module, nn.RMSNorm(
                    shape, eps=module.eps, elementwise_affine=module.elementwise_affine, **factory)), ""
            return _constant_init_like(module, nn.LayerNorm(
                shape, eps=module.eps, elementwise_affine=module.elementwise_affine,
                bias=getattr(module, "bias", None) is not None, **factory)), ""
        if kind == "embedding":
            dim = size_of(entry["dim"])
            return (module, "") if dim == module.embedding_dim else \
                (mark_fresh(nn.Embedding(module.num_embeddings, dim, padding_idx=module.padding_idx, **factory)), "")
        return module, ""

    # -- parameters, literals ------------------------------------------------------------
    def _rebuild_params(self, unit, coupling: CouplingResult, size_of, rebuilt: Dict[str, nn.Module]) -> None:
        gm = unit.module
        seed = self.options.seed
        done: Dict[int, torch.Tensor] = {}
        for target, exprs in coupling.params.items():
            owner_path, _, attr = target.rpartition(".")
            if any(owner_path == p or owner_path.startswith(p + ".") for p in rebuilt):
                continue  # a weight of a module that was rebuilt
            old = getattr_path(gm, target)
            shape = tuple(size_of(e) for e in exprs)
            if shape == tuple(old.shape):
                continue
            new = done.get(id(old))
            if new is None:
                new = _redraw(old, shape, torch.Generator().manual_seed(stream_seed(seed, target)))
                done[id(old)] = new
            owner = gm.get_submodule(owner_path) if owner_path else gm
            unit.rewrites.tensors.append(TensorRewrite(target, old, new))
            if isinstance(old, nn.Parameter):
                setattr(owner, attr, new if isinstance(new, nn.Parameter) else
                        nn.Parameter(new, requires_grad=old.requires_grad))
            else:
                owner._buffers[attr] = new

    def _rewrite_literals(self, unit, coupling: CouplingResult, size_of) -> None:
        nodes = {n.name: n for n in unit.module.graph.nodes}
        axes = coupling.axes
        for literal in coupling.literals:
            node = nodes[literal.node]
            try:
                self._rewrite_literal(unit, axes, size_of, literal, node)
            except Exception as e:  # the pass manager names the view/split and its source line
                raise at_node(e, node)

    @staticmethod
    def _rewrite_literal(unit, axes, size_of, literal, node: fx.Node) -> None:
        """Put the new size into ``node``'s arguments where the literal no longer holds."""
        new = size_of(literal.expr)
        if literal.source is not None:  # a node computing the size: keep it while it computes it
            stale = size_of(literal.source) != new
        else:
            stale = new != literal.value or any(size_of(e) != axes.original(e) for e in literal.computed)
        if not stale:
            return
        unit.rewrites.literal(node, literal.value, new)
        args = list(node.args)
        if literal.slot is None:
            args[literal.index] = new
        else:
            inner = list(args[literal.index])
            inner[literal.slot] = new
            args[literal.index] = type(node.args[literal.index])(inner)
        node.args = tuple(args)

    def _rescale_attention(self, unit, coupling: CouplingResult, size_of) -> None:
        """With head_dim widened, an explicit sdpa scale 1/sqrt(d) follows the new d."""
        nodes = {n.name: n for n in unit.module.graph.nodes}
        for name, head_dim in coupling.sdpa_scales:
            old, new = coupling.axes.original(head_dim), size_of(head_dim)
            if old != new:
                node = nodes[name]
                scale = node.kwargs["scale"] * math.sqrt(old / new)
                unit.rewrites.literal(node, node.kwargs["scale"], scale)
                node.kwargs = {**node.kwargs, "scale": scale}

    def _head_dim_note(self, axes, head_dims, size_of) -> str:
        """What the widened head dims became, against k x their size."""
        sizes = sorted({(axes.size[r], size_of(Sym(r))) for r in head_dims})
        widened = [f"{a}->{b} (k x {a} = {a * self.factor:.1f})" for a, b in sizes if a != b]
        return "head dims for attention kernels: " + (", ".join(widened) or "none widened (attention_width "
                                                       "'keep' keeps them, or none was found)")

    def _group_notes(self, coupling: CouplingResult, size_of) -> List[str]:
        axes = coupling.axes
        channel_roots = {axes.root(e) for entry in coupling.modules.values() for key, e in entry.items()
                         if key in ("in", "out", "features", "dim") and hasattr(e, "id")}
        widened = Counter()
        for root in channel_roots:
            if root not in axes.pinned and root not in axes.definition:
                widened[(axes.size[root], size_of(Sym(root)))] += 1
        notes = [f"k = {self.factor:.4f}; channel groups widened: " + ", ".join(
            f"{a}->{b}" + (f" (x{n})" if n > 1 else "") for (a, b), n in sorted(widened.items()))]
        kept = Counter(axes.pinned[r] for r in channel_roots if r in axes.pinned
                       and axes.pinned[r] not in ("model input", "model output"))
        notes += [f"kept at width ({n} group{'s' if n > 1 else ''}): {why}" for why, n in kept.most_common(8)]
        return notes

    def ensures(self, unit) -> None:
        ensure_output_shapes(unit)  # a failure to propagate is a PostconditionError naming this pass too


def _constant_init_like(old: nn.Module, new: nn.Module) -> nn.Module:
    """A widened norm starts where the model initialised the original: a constant weight or bias
    (timm's ``zero_init_last`` zeroes the last BatchNorm of each residual block) stays that constant."""
    with torch.no_grad():
        for name in ("weight", "bias"):
            before, after = getattr(old, name, None), getattr(new, name, None)
            if isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor) and before.numel() \
                    and not before.is_meta:
                first = before.detach().flatten()[0]
                if bool((before == first).all()):
                    after.fill_(float(first))
    return new


# pins that are what the user asked for: the model's interface, head counts (and `axes.asked`)
AS_ASKED = ("model input", "model output", "split count", "vocabulary", "integer", "spatial size", "stack count",
            "top-k choice")


def kept_at_width(axes, entry, first: bool = False) -> List[str]:
    """Why a layer's channels were not widened, for pins the user did not ask for. A first layer
    reading features the graph creates (a diffusion model's sinusoidal timestep embedding) reads
    them as it reads a model input: that side is not widened on purpose."""
    reasons = []
    for side in ("in", "out"):
        for root in _leaves(axes, entry[side]):
            why = axes.pinned.get(root)
            if first and side == "in" and why is not None and why.startswith("created in the graph"):
                continue
            if why is not None and root not in axes.asked and not why.startswith(AS_ASKED):
                reasons.append(f"{side}: {why}")
                break
    return reasons


def _fixed_by_output(axes, entry) -> bool:
    """Does a model output pin one side of this layer (a feature encoder's hidden width)?"""
    return any((axes.pinned.get(root) or "").startswith("model output")
               for side in ("in", "out") for root in _leaves(axes, entry[side]))


def _leaves(axes, expr) -> List[int]:
    """The roots an axis is made of: definitions expanded, down to pinned or free roots."""
    found, stack, seen = [], [axes.root(s) for s in symbols(expr)], set()
    while stack:
        root = stack.pop()
        if root in seen:
            continue
        seen.add(root)
        if root in axes.definition and root not in axes.pinned:
            stack.extend(axes.root(s) for s in symbols(axes.definition[root]))
        else:
            found.append(root)
    return found


def _is_masked(module: nn.Module) -> bool:
    return isinstance(module, MaskedLayer)


def _redraw(old: torch.Tensor, shape: Tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A tensor of the new shape drawn like the old one: N(0, std(old)), or its constant value.
    On the meta device (a compile that only plans) it has the shape and no values."""
    if old.is_meta:
        new = torch.empty(shape, dtype=old.dtype, device="meta")
        return nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new
    with torch.no_grad():
        values = old.detach().float()
        std = float(values.std()) if values.numel() > 1 else 0.0
        if std > 0:
            new = torch.randn(shape, dtype=torch.float32, generator=generator) * std
        else:
            new = torch.full(shape, float(values.flatten()[0]) if values.numel() else 0.0)
    new = new.to(old.dtype)
    return nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new
