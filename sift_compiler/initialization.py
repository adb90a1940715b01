"""First values of modules: drawn the way the model initialises its own, one stream per module.

Sparse layers, dense factors, widened embeddings and norms are new modules. They start from

- a Hugging Face model's own ``_init_weights`` (Linear/Conv/Embedding ~ N(0, initializer_range),
  zero biases, norms at one/zero), called on each new leaf module;
- otherwise the layer type's default (``reset_parameters``: Kaiming-uniform U(-1/sqrt(fan_in),
  1/sqrt(fan_in)) for Linear/Conv, N(0, 1) for Embedding, one/zero for norms). Masked layers draw
  it with NumPy in place (`MaskedLayer.init_on_mask`), which is what makes compiling 4x the dense
  parameters affordable.

Each module draws from its own stream, seeded by (seed, module path), so its values depend on
nothing else: not on the order of the passes nor on which other layers exist. A masked layer
gets the layer default drawn whole in NumPy and masked (drawing only the kept entries measured no
faster there: scattering them costs what drawing the rest does), or the model's own routine drawn
only where the mask keeps weights when the routine is elementwise (`kept_weight_init`: N(0, 0.02)
is N(0, 0.02) on any subset; torch's normal_ is the cost there), else drawn whole and masked.
A weight that comes out exactly 0.0 inside the mask is moved off zero (a normal draw gives 0.0
about once in 2^24 pairs), so that the mask's non-zeros, the FLOP report and the exported file's
zeros agree.

The same streams give `init_weights` and `materialize`: a model compiled on the meta device
(nothing allocated) becomes real where its weights will live, whole or shard by shard under FSDP2
(each rank draws a module's full tensors from its stream and keeps its own shard), and holds
exactly what a compile of real weights holds when those weights came from ``init_weights`` too:
every module by its path, every mask from its (seed, layer) stream, a masked copy of a layer (Sparse
Doped's M) from the stream of the layer it copies.
"""
from __future__ import annotations

import contextlib
import copy
import zlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from .capture.modules import is_transformers_model
from .errors import UserInputError
from .sparsity.init import layer_generator, random_mask
from .sparsity.layers import MaskedLayer

FRESH = "_sift_fresh"  # instance flag: a dense module a rewrite built that still has its type's default values


class InitPolicy:
    """How new modules are initialised; `LayerDefault` unless the model has a routine of its own."""

    name = "layer type default"

    def draw_masked(self, layer: MaskedLayer, path: str, seed: int) -> None:
        """Draw the weights of a masked layer built without values (`deferred_init`), then mask them."""
        layer.init_on_mask(layer_generator(seed, path, stream=1))

    def draw_fresh(self, module: nn.Module, path: str, seed: int) -> None:
        """Draw a dense module's own parameters and buffers from its stream: ``reset_parameters``."""
        reset = getattr(module, "reset_parameters", None)
        if reset is None:
            if any(t is not None for t in module._parameters.values()):
                raise UserInputError(f"cannot initialise {path or 'the model'} ({type(module).__name__}): it owns "
                                     "parameters and has no reset_parameters; initialise it yourself after "
                                     "materializing, or give the module a reset_parameters method")
            return
        with seeded_stream(seed, path):
            reset()


class LayerDefault(InitPolicy):
    """The layer type's own ``reset_parameters`` distribution (torchvision, timm, your own modules)."""


class HuggingFaceInit(InitPolicy):
    """The model's ``_init_weights`` (``config.initializer_range``), per new leaf module."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        std = getattr(model.config, "initializer_range", None)
        self.name = f"Hugging Face _init_weights (initializer_range {std})" if std is not None \
            else "Hugging Face _init_weights"

    def _init(self, module: nn.Module, path: str, seed: int) -> None:
        with seeded_stream(seed, path):
            self.model._init_weights(module)

    def draw_masked(self, layer: MaskedLayer, path: str, seed: int) -> None:
        """The model's init of the layer, drawn only where the mask keeps weights when the init is
        elementwise (`kept_weight_init`: the same distribution, a fraction of the draw); else the
        whole layer is drawn and masked."""
        with seeded_stream(seed, path):
            draws = kept_weight_init(lambda: self.model._init_weights(layer), layer)  # the bias is drawn here
            if draws is not None:
                values = torch.empty(int(layer.weight_mask.sum()), dtype=layer.weight.dtype, device=layer.weight.device)
                for op, args, kwargs in draws:
                    op(values, *args, **kwargs)
                nonzero_inside_mask(values)
                layer.weight.zero_().masked_scatter_(layer.weight_mask, values)
        if draws is None:
            self._init(layer, path, seed)
            with torch.no_grad():
                layer.weight.mul_(layer.weight_mask)
                nonzero_inside_mask(layer.weight, layer.weight_mask)
        layer.init_pending = False

    def draw_fresh(self, module: nn.Module, path: str, seed: int) -> None:
        self._init(module, path, seed)


_ATEN = torch.ops.aten
# In-place ops that change each value on its own, from scalars: an init made of these alone draws
# every entry from the same distribution, so drawing the kept entries alone is drawing the layer.
_ELEMENTWISE_IN_PLACE = {_ATEN.normal_, _ATEN.uniform_, _ATEN.fill_, _ATEN.zero_, _ATEN.mul_, _ATEN.add_,
                         _ATEN.sub_, _ATEN.div_, _ATEN.clamp_, _ATEN.clamp_min_, _ATEN.clamp_max_, _ATEN.erfinv_,
                         _ATEN.exponential_, _ATEN.log_normal_, _ATEN.cauchy_, _ATEN.geometric_}
_QUERIES = {torch.ops.prim.device.default, _ATEN.sym_size.int, _ATEN.sym_numel.default, _ATEN.sym_stride.int,
            _ATEN.is_contiguous.default, _ATEN.sym_storage_offset.default}


class _InitRecorder(TorchDispatchMode):
    """Records what an init routine does to a fake stand-in of one weight. Only in-place elementwise
    ops with scalar arguments are replayable; a view, copy, read or any other op on the stand-in
    (orthogonal_, trunc_normal_'s rejection loop, ``.data``) makes the routine not replayable."""

    def __init__(self, stand_in: torch.Tensor) -> None:
        super().__init__()
        self.stand_in, self.draws, self.replayable = stand_in, [], True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if any(t is self.stand_in for t in tensors):
            if func.overloadpacket in _ELEMENTWISE_IN_PLACE and args and args[0] is self.stand_in \
                    and len(tensors) == 1:
                self.draws.append((func, args[1:], kwargs))
            elif func not in _QUERIES:
                self.replayable = False
        elif any(isinstance(t, FakeTensor) for t in tensors):  # something made from the stand-in
            self.replayable = False
        return func(*args, **kwargs)


def kept_weight_init(init: Callable[[], None], layer: MaskedLayer) -> Optional[List[Tuple[Any, tuple, dict]]]:
    """Run ``init`` (which initialises ``layer``) with a fake stand-in for the layer's weight, and
    return the ops it applied to the weight, to replay on the kept entries alone; None when the init
    is not elementwise (see `_InitRecorder`) or fails on the stand-in. The layer's other tensors
    (its bias) are initialised for real."""
    weight = layer.weight
    with FakeTensorMode():
        stand_in = nn.Parameter(torch.empty(tuple(weight.shape), dtype=weight.dtype, device=weight.device),
                                requires_grad=False)
    recorder = _InitRecorder(stand_in)
    layer._parameters["weight"] = stand_in
    try:
        with recorder:
            init()
    except Exception:  # e.g. a routine that reads the values it drew: drawn whole instead
        return None
    finally:
        layer._parameters["weight"] = weight
    return recorder.draws if recorder.replayable and recorder.draws else None


def stream_seed(seed: int, path: str) -> int:
    """A torch seed of its own for the module at ``path``."""
    return (int(seed) * 1_000_003 + zlib.crc32(path.encode()) * 7919 + 2) % (2 ** 63)


@contextlib.contextmanager
def seeded_stream(seed: int, path: str) -> Iterator[None]:
    """Torch's global generator on the stream of the module at ``path`` (the caller's state is put
    back afterwards), without autograd: where every draw of a module happens."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(stream_seed(seed, path))
        yield


def nonzero_inside_mask(weight: torch.Tensor, mask: Optional[torch.Tensor] = None) -> int:
    """Move weights that are exactly 0.0 at active positions (all of them without ``mask``) off zero;
    returns how many there were."""
    zero = (weight == 0) & mask if mask is not None else weight == 0
    count = int(zero.sum())
    if count:
        scale = float(weight.abs().max()) or 1.0
        weight[zero] = scale * 2.0 ** -20
    return count


def init_policy_for(model: Optional[nn.Module]) -> InitPolicy:
    """`HuggingFaceInit` for a Hugging Face model with ``_init_weights``, else `LayerDefault`."""
    if model is not None and is_transformers_model(model) and hasattr(model, "_init_weights") \
            and getattr(model, "config", None) is not None:
        return HuggingFaceInit(model)
    return LayerDefault()


def mark_fresh(module: nn.Module) -> nn.Module:
    """Flag a dense module a rewrite just built, for the model's init routine (see the module docstring)."""
    setattr(module, FRESH, True)
    return module


COPY_OF = "sift_copy_of"  # attribute of a masked layer that holds another layer's values: that layer's path


def mark_copy(layer: MaskedLayer, original_path: str) -> MaskedLayer:
    """``layer`` starts as a copy of the layer at ``original_path`` (its values come from that stream)."""
    setattr(layer, COPY_OF, original_path)
    return layer


def init_fresh_modules(root: nn.Module, policy: InitPolicy, seed: int) -> int:
    """Apply ``policy`` to every module under ``root`` flagged by `mark_fresh`, and clear the flags."""
    count = 0
    for path, module in root.named_modules():
        if module.__dict__.pop(FRESH, False):
            policy.draw_fresh(module, path, seed)
            count += 1
    return count


def _own_tensors(module: nn.Module) -> Dict[str, torch.Tensor]:
    return {name: t for name, t in list(module._parameters.items()) + list(module._buffers.items()) if t is not None}


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def _full_stand_in(module: nn.Module, device: torch.device) -> nn.Module:
    """A shallow copy of ``module`` whose own tensors are plain, full-size and uninitialised."""
    stand_in = copy.copy(module)
    stand_in._parameters, stand_in._buffers = dict(module._parameters), dict(module._buffers)
    for table in (stand_in._parameters, stand_in._buffers):
        for name, t in table.items():
            if t is not None:
                full = torch.empty(tuple(t.shape), dtype=t.dtype, device=device)
                table[name] = nn.Parameter(full, requires_grad=False) if isinstance(t, nn.Parameter) else full
    return stand_in


def _keep_shards(module: nn.Module, stand_in: nn.Module) -> None:
    """Copy each full tensor of ``stand_in`` into ``module``'s tensor: all of it, or this rank's shard."""
    from torch.distributed.tensor import distribute_tensor
    full = _own_tensors(stand_in)
    with torch.no_grad():
        for name, target in _own_tensors(module).items():
            value = full[name]
            if _is_dtensor(target):  # every rank drew the same full tensor: no communication needed
                local = distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None)
                target.to_local().copy_(local.to_local())
            else:
                target.copy_(value)


def _init_module(module: nn.Module, path: str, policy: InitPolicy, seed: int) -> None:
    if isinstance(module, MaskedLayer):
        origin = getattr(module, COPY_OF, None)
        if module.target_density < 1:
            mask = random_mask(tuple(module.weight.shape), module.target_density, layer_generator(seed, path))
            module.weight_mask.copy_(mask.to(module.weight_mask.device))
        else:
            module.weight_mask.fill_(True)
        if origin is not None:  # a masked copy: the values of the layer it copies, then its mask (as compile does)
            policy.draw_fresh(module, origin, seed)
            with torch.no_grad():
                module.weight.mul_(module.weight_mask.to(module.weight.dtype))
        else:
            policy.draw_masked(module, path, seed)
        module.init_pending = False
    else:
        policy.draw_fresh(module, path, seed)


def init_weights(model: nn.Module, seed: int = 0, policy: Optional[InitPolicy] = None) -> int:
    """Draw every parameter, buffer and mask of ``model`` from its (seed, module path) stream.

    >>> sift.init_weights(dense_model, seed=0)                  # the dense model, reproducibly
    >>> model.to_empty(device="cpu"); sift.init_weights(model, seed=0)   # == sift.materialize(model, "cpu", 0)

    Each module that owns tensors is initialised by ``policy`` (default: the model's own,
    `init_policy_for`): masked layers get their exact-count mask first. Sharded (FSDP2 DTensor)
    parameters get their local shard of the full draw, so any number of ranks holds the same
    values. Returns how many modules were initialised.
    """
    policy = policy or init_policy_for(model)
    count = 0
    for path, module in model.named_modules():
        tensors = _own_tensors(module)
        if not tensors:
            continue
        sharded = any(_is_dtensor(t) for t in tensors.values())
        if sharded:
            device = next(t.to_local().device for t in tensors.values() if _is_dtensor(t))
            stand_in = _full_stand_in(module, device)
            _init_module(stand_in, path, policy, seed)
            _keep_shards(module, stand_in)
        else:
            _init_module(module, path, policy, seed)
        module.__dict__.pop(FRESH, None)
        count += 1
    return count


def materialize(model: nn.Module, device: Union[str, torch.device] = "cpu", seed: int = 0) -> nn.Module:
    """Allocate a model built or compiled on the meta device on ``device`` and draw its values.

    ``model.to_empty(device=device)`` followed by `init_weights`; returns ``model``. The values
    equal those of a real-weight compile of a dense model initialised with ``init_weights(dense,
    seed)`` and compiled with the same ``seed``.
    """
    model.to_empty(device=device)
    init_weights(model, seed)
    return model
