"""Static sparse training: the masks drawn at compile time never change (the paper's baseline)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .engine import MaskEngine


class Static(MaskEngine):
    """Keep the compiled masks fixed; weights, gradients and optimizer state stay exactly sparse.

    >>> masks = sift_compiler.sparsity.Static(result.module, optimizer)
    >>> ...; optimizer.step(); masks.step()

    ``pattern="nm"`` with ``n``, ``m`` replaces the masks with random transposable N:M ones.
    """

    method = "static"

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, pattern: str = "unstructured", *,
                 n: Optional[int] = None, m: Optional[int] = None, seed: int = 0) -> None:
        super().__init__(module, optimizer, None, pattern, n, m, seed)
