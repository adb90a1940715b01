"""Parameter counts as people mean them: masks are not parameters to count.

Masks are bool `nn.Parameter`s (``requires_grad=False``) so that FSDP2's ``fully_shard`` shards
them with their weights; a plain ``sum(p.numel() for p in model.parameters())`` or transformers'
``model.num_parameters()`` therefore counts every masked weight twice. `count_parameters` counts
weights only (and says how many of them a mask keeps); `MaskFreeParameterCount` is what a compiled
Hugging Face model's ``num_parameters`` becomes (`sift_compiler.compile` installs it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

import torch.nn as nn

from .init import exact_count
from .layers import iter_masked, mask_nnz


@dataclass(frozen=True)
class ParameterCount:
    """``total``: parameter elements without the masks (a shared tensor once); ``nonzero``: those a
    mask keeps (unmasked parameters in full); ``masks``: the mask elements, counted apart."""

    total: int
    nonzero: int
    masks: int


def count_parameters(module: nn.Module) -> ParameterCount:
    """The parameters of ``module`` without its masks (module docstring); works on meta and DTensors too."""
    masked: Dict[int, Any] = {}     # id(weight) -> its layer
    mask_ids = set()
    for _, layer in iter_masked(module):
        masked[id(layer.weight)] = layer
        mask_ids.add(id(layer.weight_mask))
    total = nonzero = mask_elements = 0
    for parameter in module.parameters():   # each tensor once, however often it is shared
        if id(parameter) in mask_ids:
            mask_elements += parameter.numel()
            continue
        total += parameter.numel()
        layer = masked.get(id(parameter))
        if layer is None:
            nonzero += parameter.numel()
        elif layer.weight_mask.is_meta:     # planned, not drawn: the exact count the draw will keep
            nonzero += exact_count(layer.target_density, parameter.numel())
        else:
            nonzero += mask_nnz(layer.weight_mask)  # cached per mask version: no sum over every mask again
    return ParameterCount(total, nonzero, mask_elements)


class MaskFreeParameterCount:
    """``model.num_parameters(only_trainable, exclude_embeddings)`` of a compiled Hugging Face model:
    transformers' own count less the mask elements (masks never require grad, so ``only_trainable``
    counts none). Kept in the instance's ``__dict__``, so it survives deepcopy, torch.save and FSDP2."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        counted = type(self.model).num_parameters(self.model, only_trainable, exclude_embeddings)
        return counted if only_trainable else counted - count_parameters(self.model).masks
