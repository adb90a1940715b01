"""First values of the modules a rewrite creates: drawn the way the model initialises its own.

Sparse layers, dense factors, widened embeddings and norms are new modules. They start from

- a Hugging Face model's own ``_init_weights`` (Linear/Conv/Embedding ~ N(0, initializer_range),
  zero biases, norms at one/zero), called on each new leaf module;
- otherwise the layer type's default (``reset_parameters``: Kaiming-uniform U(-1/sqrt(fan_in),
  1/sqrt(fan_in)) for Linear/Conv, N(0, 1) for Embedding, one/zero for norms). Masked layers draw
  it with NumPy in place (`MaskedLayer.init_on_mask`), which is what makes compiling 4x the dense
  parameters affordable.

Each module draws from its own stream, seeded by (seed, module path), so its values depend on
nothing else: not on the order of the passes nor on which other layers exist. A masked layer is
multiplied by its mask afterwards, and a weight that comes out exactly 0.0 inside the mask is
moved off zero (a normal draw gives 0.0 about once in 2^24 pairs), so that the mask's non-zeros,
the FLOP report and the exported file's zeros agree.
"""
from __future__ import annotations

import zlib
from typing import Optional

import torch
import torch.nn as nn

from .sparsity.init import layer_generator
from .sparsity.layers import MaskedLayer

FRESH = "_sift_fresh"  # instance flag: a dense module a rewrite built that still has its type's default values


class InitPolicy:
    """How new modules are initialised; `LayerDefault` unless the model has a routine of its own."""

    name = "layer type default"

    def draw_masked(self, layer: MaskedLayer, path: str, seed: int) -> None:
        """Draw the weights of a masked layer built without values (`deferred_init`), then mask them."""
        layer.init_on_mask(layer_generator(seed, path, stream=1))

    def draw_fresh(self, module: nn.Module, path: str, seed: int) -> None:
        """(Re)draw a dense module a rewrite built; the type default already holds its values."""


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
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(stream_seed(seed, path))
            self.model._init_weights(module)

    def draw_masked(self, layer: MaskedLayer, path: str, seed: int) -> None:
        self._init(layer, path, seed)
        with torch.no_grad():
            layer.weight.mul_(layer.weight_mask.to(layer.weight.dtype))
            nonzero_inside_mask(layer.weight, layer.weight_mask)
        layer.init_pending = False

    def draw_fresh(self, module: nn.Module, path: str, seed: int) -> None:
        self._init(module, path, seed)


def stream_seed(seed: int, path: str) -> int:
    """A torch seed of its own for the module at ``path``."""
    return (int(seed) * 1_000_003 + zlib.crc32(path.encode()) * 7919 + 2) % (2 ** 63)


def nonzero_inside_mask(weight: torch.Tensor, mask: torch.Tensor) -> int:
    """Move weights that are exactly 0.0 at active positions off zero; returns how many there were."""
    zero = (weight == 0) & mask
    count = int(zero.sum())
    if count:
        scale = float(weight.abs().max()) or 1.0
        weight[zero] = scale * 2.0 ** -20
    return count


def init_policy_for(model: Optional[nn.Module]) -> InitPolicy:
    """`HuggingFaceInit` for a Hugging Face model with ``_init_weights``, else `LayerDefault`."""
    from .capture.tracer import is_transformers_model
    if model is not None and is_transformers_model(model) and hasattr(model, "_init_weights") \
            and getattr(model, "config", None) is not None:
        return HuggingFaceInit(model)
    return LayerDefault()


def mark_fresh(module: nn.Module) -> nn.Module:
    """Flag a dense module a rewrite just built, for the model's init routine (see the module docstring)."""
    setattr(module, FRESH, True)
    return module


def init_fresh_modules(root: nn.Module, policy: InitPolicy, seed: int) -> int:
    """Apply ``policy`` to every module under ``root`` flagged by `mark_fresh`, and clear the flags."""
    count = 0
    for path, module in root.named_modules():
        if module.__dict__.pop(FRESH, False):
            policy.draw_fresh(module, path, seed)
            count += 1
    return count
