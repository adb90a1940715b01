"""`make_engine`: the mask engine named by a string, for the trainer integrations and the CLI.

Above engine.py and the engines it names (Static, SET, RigL), which import engine.py.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from ..errors import UserInputError
from .engine import MaskEngine
from .evolution import SET
from .rigl import RigL
from .static import Static


ENGINE_METHODS = ("static", "set", "rigl")


def make_engine(method: str, module: nn.Module, optimizer: torch.optim.Optimizer,
                total_steps: Optional[int] = None, **options: Any) -> MaskEngine:
    """The engine named ``method`` ("static", "set" or "rigl") for ``module`` and ``optimizer``.

    ``total_steps`` (optimizer steps in the run) is needed by SET and RigL; ``options`` are the
    engine's keyword arguments (``update_interval``, ``drop_fraction``, ``end_fraction``,
    ``pattern``, ``n``, ``m``, ``seed``). Used by the trainer integrations.
    """
    if method not in ENGINE_METHODS:
        raise UserInputError(f"unknown sparse training method {method!r}: choose one of {', '.join(ENGINE_METHODS)}")
    if method == "static":
        unknown = set(options) - {"pattern", "n", "m", "seed"}
        if unknown:
            raise UserInputError(f"Static takes no {', '.join(sorted(unknown))} (it never updates the masks)")
        return Static(module, optimizer, **options)
    if not isinstance(total_steps, int) or total_steps < 1:
        raise UserInputError(f"{method} needs total_steps, the number of optimizer steps of the run (got {total_steps!r})")
    return {"set": SET, "rigl": RigL}[method](module, optimizer, total_steps, **options)
