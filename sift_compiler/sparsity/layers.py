"""Masked weight layers: `nn.Linear`/`nn.ConvNd` whose weight is multiplied by a boolean mask.

`MaskedLinear(d_in, d_out)` computes `x @ (W * M).T + b`. The mask ``weight_mask`` is a bool
`nn.Parameter` that is never trained (``requires_grad=False``): it is in the state dict and
travels with checkpoints, and, being a parameter, FSDP2's ``fully_shard`` shards it with its
weight (each rank holds the rows of the mask that match its rows of the weight; buffers would be
replicated whole on every rank). Optimizers skip it (it never has a gradient). The product happens
in forward, so gradients reach only unmasked weights without any hook. The masked positions of
``weight`` itself are kept at zero by the mask engine; export bakes the product into exact zeros.

Dense-gradient mode (``layer.dense_grad = True``, set by the RigL engine on the steps before a
mask update): RigL grows where the dense gradient dL/d(W*M) is largest. In eager mode with an
engine, the backward adds that dense gradient to a side buffer of the layer (``dense_grad_sum``,
summed over micro-batches and over the calls of a shared layer) and puts only the masked gradient
in ``weight.grad``: whatever looks at gradients before the optimizer (gradient clipping in a
trainer, a norm logger) sees the sparse gradient, on every step, with nothing to call. The engine
all-reduces the side buffers of a distributed run at the update. Traced and compiled code
computes ``W - (W * ~M).detach()`` instead: the value of ``W * M`` with gradient 1 everywhere, so
``weight.grad`` holds the dense gradient until `MaskEngine.mask_gradients` stashes and masks it.

Sharded layers (``layer.sharded = True``, set by the engine or `sift_compiler.distributed` when
FSDP2 shards the layer): inside forward, FSDP2 hands the layer its all-gathered weight and mask
and frees them afterwards. Such a layer keeps no float copy of its mask (a cached copy would be
a full-size tensor per layer on every rank, and FSDP2 rewrites the gathered mask in place without
bumping its version, so the cache could go stale): it multiplies by the bool mask, and autograd
keeps only the bool mask, which FSDP2 gathers again for the backward. Engine-managed, its
backward leaves the gradient as it is in ``weight.grad`` (FSDP2 reduce-scatters it to the shards;
on RigL's update steps that is the dense gradient, with no full-size side buffer) and asks the
engine to mask it on each rank's shard once the backward is done.

Engine-managed mode (``layer.engine_managed = True``, set while a mask engine trains the layer):
the engine keeps the weights exactly zero off the mask after every step, so in eager mode the
forward uses ``W`` itself (no product tensor per forward, which costs several percent of a CPU
training step) and only the backward multiplies the gradient by the mask. Outputs and gradients
are the same as with ``W * M``. Traced, scripted and compiled code always computes ``W * M``.

Deferred initialisation (`deferred_init()`): a rewrite that builds 4x the dense parameters
(Sparse Parallel at 0.75) spent most of its time drawing weights and then masking them. Masked
layers made by `new_layer` inside ``with deferred_init():`` skip their initialisation
(``init_pending``: neither weights nor mask hold values yet, the mask counts as all ones) until
`sparsity.init.init_masks` installs their mask and calls `MaskedLayer.init_on_mask`: the module
type's own distribution, masked, drawn in place by NumPy from a per-layer stream (so the weights,
like the masks, depend on the seed and layer name only).

`mask_nnz(mask)` counts a mask's non-zeros once per in-place change; masks made here (all ones)
and drawn by `init_masks` (exact counts) are known without counting (`remember_nnz`).
"""
from __future__ import annotations

import copy

import contextlib
import contextvars
import math
from typing import Dict, Iterator, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary


_NNZ_CACHE = WeakIdKeyDictionary()  # mask tensor -> (version, non-zeros)


def mask_nnz(mask: torch.Tensor) -> int:
    """Non-zeros of a mask, cached until the tensor is modified in place (its version changes)."""
    cached = _NNZ_CACHE.get(mask)
    if cached is not None and cached[0] == mask._version:
        return cached[1]
    count = int(torch.count_nonzero(mask))
    _NNZ_CACHE[mask] = (mask._version, count)
    return count


def remember_nnz(mask: torch.Tensor, count: int) -> None:
    """Record the non-zeros of a mask just made, so `mask_nnz` need not count them."""
    _NNZ_CACHE[mask] = (mask._version, count)


def _tracing() -> bool:
    """True under torch.compile/export, TorchScript and FX symbolic tracing."""
    fx_trace = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing", None)  # newer torch; no warning
    if fx_trace is None:
        fx_trace = torch.fx._symbolic_trace.is_fx_tracing
    return bool(torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting() or fx_trace())


_FLOAT_MASKS = WeakIdKeyDictionary()  # mask tensor -> (its version, the mask as 0/1 in the weight's dtype)


class _MaskGradient(torch.autograd.Function):
    """Forward: the weight as it is (zero off the mask); backward: the gradient times the mask."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(mask)
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return grad * mask, None


class _DenseGradientTap(torch.autograd.Function):
    """Forward: the weight as it is; backward: the dense gradient into the layer's side buffer,
    the gradient times the mask into ``weight.grad``."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, mask: torch.Tensor, layer: "MaskedLayer") -> torch.Tensor:
        ctx.save_for_backward(mask)
        ctx.layer = layer
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        total = ctx.layer.__dict__.get("dense_grad_sum")
        if total is None:
            ctx.layer.__dict__["dense_grad_sum"] = grad.detach().clone()
        else:
            total.add_(grad)
        return grad * mask, None, None


class _ShardedGradient(torch.autograd.Function):
    """Sharded engine-managed layers: forward the weight as it is; backward the gradient as it is
    into ``weight.grad`` (FSDP2 reduce-scatters it) and the engine's end-of-backward masking queued,
    which masks each rank's shard (1/world of the work of masking the gathered gradient) and, on
    update steps, first keeps the dense gradient RigL grows from."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, layer: "MaskedLayer") -> torch.Tensor:
        ctx.layer = layer
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        done = ctx.layer.__dict__.get("after_backward")
        if done is not None:
            done()
        return grad, None


def forget_float_masks() -> None:
    """Drop every cached float mask (e.g. ones cached from FSDP2's gathered masks before a layer
    was known to be sharded)."""
    _FLOAT_MASKS.clear()


class MaskedLayer:
    """Mixin: a weight layer with a ``weight_mask`` (a bool parameter, never trained) and a target density."""

    weight: nn.Parameter
    weight_mask: torch.Tensor
    target_density: float
    dense_grad: bool = False       # straight-through mode, see the module docstring
    engine_managed: bool = False   # weights are zero off the mask (a mask engine guarantees it)
    sharded: bool = False          # FSDP2 shards weight and mask: no cached float mask, see above

    init_pending: bool = False     # weights not drawn yet (deferred_init); init_on_mask draws them

    def _init_mask(self) -> None:
        self.weight_mask = nn.Parameter(torch.ones_like(self.weight, dtype=torch.bool), requires_grad=False)
        remember_nnz(self.weight_mask, self.weight_mask.numel())
        self.target_density = 1.0

    def install_mask(self, mask: torch.Tensor) -> None:
        """Make ``mask`` (bool, the weight's shape) the layer's mask, without copying it on the CPU.
        The weights are left alone (`init_on_mask` draws them for a layer waiting for init)."""
        if self.weight_mask.device == mask.device and mask.dtype == torch.bool and mask.is_contiguous():
            self.weight_mask = nn.Parameter(mask, requires_grad=False)  # shares the mask's storage
        else:
            self.weight_mask.copy_(mask)

    def masked_weight(self) -> torch.Tensor:
        managed = self.engine_managed and not _tracing()
        if self.sharded:
            if managed:
                return self.weight if not torch.is_grad_enabled() else _ShardedGradient.apply(self.weight, self)
            if not self.dense_grad:
                return self.weight * self.weight_mask  # autograd keeps the bool mask, not a float copy
        if self.dense_grad:
            if managed:  # already zero off the mask: the value is W * M; the dense gradient goes aside
                return _DenseGradientTap.apply(self.weight, self.float_mask(), self)
            # value W*M exactly (w - w == 0 for finite w), gradient to W dense
            return self.weight - (self.weight * (~self.weight_mask).to(self.weight.dtype)).detach()
        if managed:
            if not torch.is_grad_enabled():  # inference: W is W * M, nothing to mask
                return self.weight
            return _MaskGradient.apply(self.weight, self.float_mask())
        return self.weight * self.float_mask()

    def float_mask(self) -> torch.Tensor:
        """The mask as 0/1 in the weight's dtype and device.

        In eager mode it is cached until the mask changes in place (its version counter moves:
        set_mask, load_state_dict, copy_): converting a bool mask costs as much as the product
        itself, on every forward. Traced, scripted and compiled code converts inline.
        """
        mask, weight = self.weight_mask, self.weight
        if _tracing() or self.sharded:
            return mask.to(weight.dtype)
        # keyed by the mask tensor itself, not kept in the module: a deep copy of the module has
        # new masks whose version counters restart and could match a copied entry
        cache = _FLOAT_MASKS.get(mask)
        if cache is None or cache[0] != mask._version or cache[1].dtype != weight.dtype \
                or cache[1].device != weight.device:
            cache = (mask._version, mask.to(weight.dtype))
            _FLOAT_MASKS[mask] = cache
        return cache[1]

    def set_mask(self, mask: torch.Tensor) -> None:
        """Install ``mask`` and zero the weights it removes (so they stay exact zeros)."""
        if mask.shape != self.weight.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match weight {tuple(self.weight.shape)}")
        with torch.no_grad():
            self.weight_mask.copy_(mask.to(torch.bool))
            self.weight.mul_(self.weight_mask.to(self.weight.dtype))

    def init_on_mask(self, generator: np.random.Generator) -> None:
        """Draw the weights as ``reset_parameters`` does, then zero them off the mask.

        `nn.Linear` and `nn.ConvNd` draw W and b from U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (Kaiming
        uniform with a = sqrt(5)). NumPy draws and masks in place in about half the time of torch's
        ``uniform_`` followed by a masked product, which matters at 4x the dense parameter count.
        """
        fan_in = self.weight[0].numel()
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        with torch.no_grad():
            weight = self.weight.detach()
            in_place = weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.is_contiguous()
            values = weight.numpy() if in_place else np.empty(tuple(weight.shape), np.float32)
            _symmetric_uniform(generator, values, bound)
            np.multiply(values, self.weight_mask.cpu().numpy(), out=values)
            if not in_place:
                self.weight.copy_(torch.from_numpy(values))
            if self.bias is not None:
                bias = _symmetric_uniform(generator, np.empty(tuple(self.bias.shape), np.float32), bound)
                self.bias.copy_(torch.from_numpy(bias))
        self.init_pending = False

    @property
    def density(self) -> float:
        """Fraction of active weights; of this rank's shard when FSDP2 shards the mask (no collective)."""
        mask = self.weight_mask
        mask = mask.to_local() if hasattr(mask, "to_local") else mask
        return float(mask.sum()) / max(mask.numel(), 1)

    def extra_repr(self) -> str:  # shown by print(model)
        shard = " (this rank's shard)" if hasattr(self.weight_mask, "to_local") else ""
        return f"{super().extra_repr()}, density={self.density:.4f}{shard}"


def _symmetric_uniform(generator: np.random.Generator, out: np.ndarray, bound: float) -> np.ndarray:
    """Fill ``out`` (float32) with U(-bound, bound) on a grid that is symmetric and misses 0."""
    generator.random(out=out, dtype=np.float32)
    return unit_to_symmetric(out, bound)


def unit_to_symmetric(u: np.ndarray, bound: float) -> np.ndarray:
    """Map float32 draws u in [0, 1) (multiples of 2^-24) in place to (-bound, bound), never 0.

    2u - 1 + 2^-24 is exact in float32 and lands on the odd multiples of 2^-24 in (-1, 1). A plain
    ``2u - 1`` is exactly 0 at u = 0.5, and a weight that is 0 inside its mask would make the
    file's non-zeros disagree with the FLOP report.
    """
    u *= 2
    u -= 1.0 - 2.0 ** -24  # = (2u - 1) + 2^-24, exactly (1 - 2^-24 is a float32), in one pass less
    u *= bound
    return u


class MaskedLinear(MaskedLayer, nn.Linear):
    """`nn.Linear` with a weight mask: y = x (W * M)^T + b."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kw) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=bias, **kw)
        self._init_mask()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight(), self.bias)


class _MaskedConv(MaskedLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.masked_weight(), self.bias)


class MaskedConv1d(_MaskedConv, nn.Conv1d):
    """`nn.Conv1d` with a weight mask."""

    def __init__(self, *args, **kw) -> None:
        nn.Conv1d.__init__(self, *args, **kw)
        self._init_mask()


class MaskedConv2d(_MaskedConv, nn.Conv2d):
    """`nn.Conv2d` with a weight mask."""

    def __init__(self, *args, **kw) -> None:
        nn.Conv2d.__init__(self, *args, **kw)
        self._init_mask()


class MaskedConv3d(_MaskedConv, nn.Conv3d):
    """`nn.Conv3d` with a weight mask."""

    def __init__(self, *args, **kw) -> None:
        nn.Conv3d.__init__(self, *args, **kw)
        self._init_mask()


_MASKED_CONV = {1: MaskedConv1d, 2: MaskedConv2d, 3: MaskedConv3d}
_PLAIN_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
WEIGHT_LAYER_TYPES: Tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


_DEFER_INIT: contextvars.ContextVar[bool] = contextvars.ContextVar("sift_defer_init", default=False)


@contextlib.contextmanager
def deferred_init() -> Iterator[None]:
    """Masked layers made by `new_layer` in this block leave their weights to `init_masks`.

    Their weights hold uninitialised memory and ``init_pending`` is True until
    `sparsity.init.init_masks` (the `InitMasksPass`) draws the mask and then the weights.
    """
    token = _DEFER_INIT.set(True)
    try:
        yield
    finally:
        _DEFER_INIT.reset(token)


def new_layer(layer: nn.Module, masked: bool = True, **overrides) -> nn.Module:
    """A fresh layer with ``layer``'s hyper-parameters, optionally changed.

    ``new_layer(conv, out_channels=2 * conv.out_channels)`` gives a `MaskedConv2d` with new
    weights, initialised as the module type initialises them, and an all-ones mask;
    ``masked=False`` gives the plain `nn.Conv2d`. Inside `deferred_init()` a masked layer's
    weights are left for `init_masks` to draw.
    """
    if masked and _DEFER_INIT.get():
        # built on the meta device (no initialisation), then given real, uninitialised storage; the
        # mask counts as all ones until init_masks installs one
        fresh = _build_layer(layer, True, "meta", overrides).to_empty(device=layer.weight.device)
        remember_nnz(fresh.weight_mask, fresh.weight_mask.numel())
        fresh.init_pending = True
        return fresh
    built = _build_layer(layer, masked, layer.weight.device, overrides)
    if not masked:  # the model's own init routine may redraw it (`initialization.init_fresh_modules`)
        built.__dict__["_sift_fresh"] = True
    return built


def _build_layer(layer: nn.Module, masked: bool, device, overrides: Dict) -> nn.Module:
    factory = {"device": device, "dtype": layer.weight.dtype}
    if isinstance(layer, nn.Linear):
        args = dict(in_features=layer.in_features, out_features=layer.out_features, bias=layer.bias is not None)
        args.update(overrides)
        return (MaskedLinear if masked else nn.Linear)(**args, **factory)
    if isinstance(layer, nn.modules.conv._ConvNd) and not layer.transposed:
        args = dict(in_channels=layer.in_channels, out_channels=layer.out_channels,
                    kernel_size=layer.kernel_size, stride=layer.stride, padding=layer.padding,
                    dilation=layer.dilation, groups=layer.groups, bias=layer.bias is not None,
                    padding_mode=layer.padding_mode)
        args.update(overrides)
        table = _MASKED_CONV if masked else _PLAIN_CONV
        return table[len(layer.kernel_size)](**args, **factory)
    raise TypeError(f"{type(layer).__name__} is not a Linear or Conv1d/2d/3d layer")


def iter_masked(module: nn.Module) -> Iterator[Tuple[str, MaskedLayer]]:
    """(qualified name, layer) for every masked layer under ``module``."""
    for name, sub in module.named_modules():
        if isinstance(sub, MaskedLayer):
            yield name, sub


def masks(module: nn.Module) -> Dict[str, torch.Tensor]:
    """``{parameter name: bool mask}`` for every masked weight of ``module``.

    >>> masks(result.module)["layer1.0.conv1.branches.0.layer.weight"].float().mean()  # density
    """
    return {f"{name}.weight" if name else "weight": layer.weight_mask for name, layer in iter_masked(module)}


def masked_copy(layer: nn.Module) -> nn.Module:
    """A masked layer computing exactly what ``layer`` computes (same weights, all-ones mask)."""
    with deferred_init():  # the copy overwrites the weights: drawing them first would be wasted
        masked = new_layer(layer, masked=True)
    with torch.no_grad():
        masked.weight_mask.fill_(True)
        remember_nnz(masked.weight_mask, masked.weight_mask.numel())
        masked.weight.copy_(layer.weight)
        if layer.bias is not None:
            masked.bias.copy_(layer.bias)
    masked.init_pending = False
    masked.train(layer.training)
    return masked


def plain_copy(layer: nn.Module) -> nn.Module:
    """The plain layer of a masked one, with the mask baked into exact (+0.0) zeros."""
    plain = new_layer(layer, masked=False)
    plain.__dict__.pop("_sift_fresh", None)  # holds the trained values, not new ones
    with torch.no_grad():
        weight = layer.weight
        if isinstance(layer, MaskedLayer):
            weight = torch.where(layer.weight_mask, weight, torch.zeros((), dtype=weight.dtype))
        plain.weight.copy_(weight)
        if layer.bias is not None:
            plain.bias.copy_(layer.bias)
    plain.train(layer.training)
    return plain


def bake_masks(module: nn.Module, inplace: bool = False) -> nn.Module:
    """A deep copy of ``module`` (or ``module`` itself) in which masked layers are plain layers with exact zeros."""
    baked = module if inplace else copy.deepcopy(module)
    for name, layer in list(iter_masked(baked)):
        baked.set_submodule(name, plain_copy(layer))
    return baked
