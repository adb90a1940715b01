"""Parameter counts as people mean them: masks are not parameters to count.

Masks are bool `nn.Parameter`s (``requires_grad=False``) so that FSDP2's ``fully_shard`` shards
them with their weights; a plain ``sum(p.numel() for p in model.parameters())`` or transformers'
``model.num_parameters()`` therefore counts every masked weight twice. `count_parameters` counts
weights only (and says how many of them a mask keeps); `MaskFreeParameterCount` is what a compiled
Hugging Face model's ``num_parameters`` becomes (`sift_compiler.compile` installs it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch.nn as nn

from .init import exact_count
from .layers import MaskedLayer, iter_masked, mask_nnz


def planned_nnz(layer: Any) -> int:
    """The non-zeros of a masked layer's mask: counted, or on the meta device (nothing drawn, a
    compile that only plans) the exact count its target density will draw."""
    if layer.weight_mask.is_meta:
        numel = layer.weight.numel()
        return exact_count(layer.target_density, numel) if layer.target_density < 1 else numel
    return mask_nnz(layer.weight_mask)  # cached per mask version: no sum over every mask again


@dataclass(frozen=True)
class ParameterCount:
    """``total``: parameter elements without the masks (a shared tensor once); ``nonzero``: those a
    mask keeps (unmasked parameters in full); ``masks``: the mask elements, counted apart;
    ``active``/``active_nonzero``: what one token uses (a routed expert's parameters at its share)."""

    total: int
    nonzero: int
    masks: int
    active: int
    active_nonzero: int


def count_parameters(module: nn.Module, shares: Optional[Mapping[str, float]] = None) -> ParameterCount:
    """The parameters of ``module`` without its masks (module docstring); works on meta and DTensors too.

    ``shares``: {module path: the fraction of tokens that use it} (a mixture of experts' experts,
    `analyses.flops.routed_shares`); every other module counts in full towards ``active``.
    """
    shares = shares or {}
    mask_ids = {id(layer.weight_mask) for _, layer in iter_masked(module)}
    seen = set()
    total = nonzero = masks = 0
    active = active_nonzero = 0.0
    for path, owner in module.named_modules():
        for name, parameter in owner.named_parameters(recurse=False):
            if id(parameter) in seen:   # each tensor once, however often it is shared
                continue
            seen.add(id(parameter))
            if id(parameter) in mask_ids:
                masks += parameter.numel()
                continue
            numel = parameter.numel()
            kept = planned_nnz(owner) if isinstance(owner, MaskedLayer) and name == "weight" else numel
            share = shares.get(path, 1.0)
            total, nonzero = total + numel, nonzero + kept
            active, active_nonzero = active + share * numel, active_nonzero + share * kept
    return ParameterCount(total, nonzero, masks, round(active), round(active_nonzero))


class MaskFreeParameterCount:
    """``model.num_parameters(only_trainable, exclude_embeddings)`` of a compiled Hugging Face model:
    transformers' own count less the mask elements (masks never require grad, so ``only_trainable``
    counts none). Kept in the instance's ``__dict__``, so it survives deepcopy, torch.save and FSDP2."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        counted = type(self.model).num_parameters(self.model, only_trainable, exclude_embeddings)
        return counted if only_trainable else counted - count_parameters(self.model).masks
