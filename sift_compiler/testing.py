"""Helpers for tests of passes and exporters (ours and users')."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from .api import CompileResult


def output_tensors(module: nn.Module, args: Sequence[Any] = (), kwargs=None) -> list:
    """The tensors a module returns, flattened (ModelOutput, tuples and dicts included)."""
    out = module(*args, **(kwargs or {}))
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def assert_iso_flop(result: CompileResult, tolerance: float = 0.005) -> None:
    ratio = result.report.flop_ratio
    assert abs(ratio - 1) <= tolerance, f"sift/dense weight FLOPs = {ratio:.5f}, outside 1 +- {tolerance}"


def assert_masks_exact(module: nn.Module) -> None:
    """Every masked weight is zero where its mask is, and masks have exact counts."""
    from .sparsity.init import exact_count
    from .sparsity.layers import iter_masked
    for name, layer in iter_masked(module):
        assert layer.weight_mask.shape == layer.weight.shape, name
        assert not bool(((layer.weight != 0) & ~layer.weight_mask).any()), f"{name}: masked weights are not zero"
        if layer.target_density < 1:
            assert int(torch.count_nonzero(layer.weight_mask)) == exact_count(layer.target_density, layer.weight.numel()), name
