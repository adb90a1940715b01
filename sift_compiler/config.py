"""Options of a compilation, frozen so passes cannot change them under each other's feet."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

from .errors import UserInputError

TRANSFORMS = ("none", "parallel", "factorized", "doped", "wide")
BUDGETS = ("flops", "latency")
ACTIVATIONS = ("auto", "relu", "gelu", "silu")


@dataclass(frozen=True)
class CompileConfig:
    """What to compile: the transform, the sparsity s and the knobs that decide layers and masks.

    ``sparsity`` is the requested s of the paper; the sparse layers end up at the compensated
    s' that makes the model iso-FLOP (reported as ``effective_sparsity``).

    ``capacity`` sets the size of the transform instead of the iso-FLOP formula (None: the formula):

    ============  ==========================================================================
    wide          the width factor k itself (iso-FLOP: sqrt(1/(1-s)))
    parallel      the branch count B, rounded to an integer (iso-FLOP: round(1/(1-s)))
    factorized    the hidden width h as a multiple of its iso-FLOP value (1.0: the formula)
    doped         the rank r as a multiple of its iso-FLOP value (1.0: the formula)
    ============  ==========================================================================

    ``budget``: "flops" (the paper: the compensation makes the model iso-FLOP) or "latency" (the
    sparse layers stay at s, no compensation, no iso-FLOP check; `sift_compiler.latency` searches
    the capacity whose measured latency meets the dense model's).
    """

    transform: str = "none"
    sparsity: float = 0.0
    seed: int = 0
    keep_dense: Tuple[str, ...] = ()
    activation: str = "auto"          # sigma between/after sparse Linear layers
    linear_norm: bool = False         # add a LayerNorm to sigma for Linear layers
    flop_tolerance: float = 0.005     # |sift/dense - 1| allowed by the iso-FLOP check
    round_to: int = 1                 # Sparse Wide: channel multiple
    attention_width: str = "keep"     # Sparse Wide on attention: keep heads x head_dim, or scale
    capacity: Optional[float] = None  # the transform's size, overriding the iso-FLOP formula (see above)
    budget: str = "flops"             # "flops": iso-FLOP compensation; "latency": sparse layers stay at s
    strict: bool = False              # a transform not applied as asked is an error, not a warning

    def __post_init__(self) -> None:
        validate_sparsity(self.sparsity, allow_zero=True)
        if self.transform not in TRANSFORMS:
            raise UserInputError(f"unknown transform {self.transform!r}: choose one of {', '.join(TRANSFORMS)}")
        if self.activation not in ACTIVATIONS:
            raise UserInputError(f"unknown activation {self.activation!r}: choose one of {', '.join(ACTIVATIONS)}")
        if self.round_to < 1:
            raise UserInputError(f"round_to must be a positive integer, got {self.round_to}")
        if self.attention_width not in ("keep", "scale"):
            raise UserInputError(f"attention_width must be 'keep' or 'scale', got {self.attention_width!r}")
        if self.capacity is not None and not (isinstance(self.capacity, (int, float)) and self.capacity > 0
                                              and math.isfinite(self.capacity)):
            raise UserInputError(f"capacity must be a positive number, got {self.capacity!r}")
        if self.budget not in BUDGETS:
            raise UserInputError(f"budget must be one of {', '.join(BUDGETS)}, got {self.budget!r}")
        if not 0 < self.flop_tolerance < 1:
            raise UserInputError(f"flop_tolerance must lie in (0, 1), got {self.flop_tolerance}")

    @property
    def density(self) -> float:
        return 1.0 - self.sparsity


def validate_sparsity(value: object, allow_zero: bool = False) -> float:
    """A float s with 0 < s < 1 (0 <= s when ``allow_zero``), or a UserInputError saying why not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserInputError(f"sparsity must be a number in (0, 1), got {value!r}")
    s = float(value)
    low_ok = s >= 0 if allow_zero else s > 0
    if math.isnan(s) or not low_ok or s >= 1:
        bound = "[0, 1)" if allow_zero else "(0, 1)"
        raise UserInputError(f"sparsity must lie in {bound} (the fraction of zero weights), got {value!r}")
    return s
