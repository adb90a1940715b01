"""Helpers for tests of passes and exporters (ours and users')."""
from __future__ import annotations

import torch
import torch.nn as nn

from .sparsity.init import exact_count
from .sparsity.layers import iter_masked


def assert_masks_exact(module: nn.Module) -> None:
    """Every masked weight is zero where its mask is, and masks have exact counts."""
    for name, layer in iter_masked(module):
        assert layer.weight_mask.shape == layer.weight.shape, name
        assert not bool(((layer.weight != 0) & ~layer.weight_mask).any()), f"{name}: masked weights are not zero"
        if layer.target_density < 1:
            assert int(torch.count_nonzero(layer.weight_mask)) == exact_count(layer.target_density, layer.weight.numel()), name
