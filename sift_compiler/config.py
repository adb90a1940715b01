"""Options of a compilation, frozen so passes cannot change them under each other's feet."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, TextIO, Tuple

from .errors import UserInputError
from .registry import get_transform, transform_names
from .sparsity.nm import parse_nm_pattern as parse_pattern

BUDGETS = ("flops", "latency")
ACTIVATIONS = ("auto", "relu", "gelu", "silu")
OUTPUTS = ("auto", "native", "graph")   # what `compile` returns (`CompileOptions.output`)


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

    ``flop_tolerance``: None (default) lets the iso-FLOP check allow exactly what per-layer
    rounding can explain (`passes.verify.rounding_bound`); a number replaces that bound with
    ``|sift/dense - 1| <= flop_tolerance``.

    ``kernel_head_dims``: Sparse Wide rounds every head dim it widens (``attention_width="scale"``)
    to a size FlashAttention, SDPA's fused kernels and vLLM accept: a multiple of 8 up to 256,
    preferring 32/64/80/96/112/120/128/192/256 within 12.5% (`passes.sparse_wide.kernel_head_dim`);
    the report's notes say what it chose.

    ``pattern``: "unstructured" (default: exact-count random masks) or "N:M" such as "2:4": every
    sparse layer gets a transposable N:M mask (`sparsity.nm`) at exactly s = 1 - N/M, which
    ``sparsity`` must then equal. The sparse layers are not compensated (they stay at N/M, so the
    result is near iso-FLOP, not exactly: the report gives the ratio), and Sparse Wide rounds its
    widened channels to multiples of M too (`channel_multiple`: lcm(round_to, M); ``round_to`` stays as
    asked). "2:4" at s = 0.5 (k = sqrt 2) is the pattern GPU 2:4 kernels run
    (`sift_compiler.deploy.to_semi_structured`).

    ``transform`` is any name in the transform registry (`registry.transform_names`), including
    ones registered with `registry.register_transform`.
    """

    transform: str = "none"
    sparsity: float = 0.0
    seed: int = 0
    keep_dense: Tuple[str, ...] = ()
    activation: str = "auto"          # sigma between/after sparse Linear layers
    linear_norm: bool = False         # add a LayerNorm to sigma for Linear layers
    flop_tolerance: Optional[float] = None  # |sift/dense - 1| allowed (None: what rounding explains; VerifyPass)
    round_to: int = 1                 # Sparse Wide: channel multiple
    attention_width: str = "keep"     # Sparse Wide on attention: keep heads x head_dim, or scale
    kernel_head_dims: bool = False    # Sparse Wide: widened head dims that attention kernels accept
    capacity: Optional[float] = None  # the transform's size, overriding the iso-FLOP formula (see above)
    budget: str = "flops"             # "flops": iso-FLOP compensation; "latency": sparse layers stay at s
    strict: bool = False              # a transform not applied as asked is an error, not a warning
    pattern: str = "unstructured"     # or "N:M" (e.g. "2:4"): transposable N:M masks at s = 1 - N/M

    def __post_init__(self) -> None:
        validate_sparsity(self.sparsity, allow_zero=True)
        if self.transform not in transform_names():
            raise UserInputError(f"unknown transform {self.transform!r}: choose one of {', '.join(transform_names())}")
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
        if self.flop_tolerance is not None and not (isinstance(self.flop_tolerance, (int, float))
                                                    and 0 < self.flop_tolerance < 1):
            raise UserInputError(f"flop_tolerance must lie in (0, 1), got {self.flop_tolerance}")
        nm = parse_pattern(self.pattern)
        if nm is not None:
            n, m = nm
            if self.transform == "none":
                raise UserInputError(f"pattern {self.pattern!r} needs a Sparse-IFT transform (the dense baseline has "
                                     "no masks): pass transform='wide' (or another)")
            if abs(self.sparsity - (1 - n / m)) > 1e-9:
                raise UserInputError(f"pattern {self.pattern!r} fixes the sparsity at {1 - n / m:g} (N of every M "
                                     f"weights kept), got sparsity={self.sparsity:g}: pass sparsity={1 - n / m:g}")

    @property
    def nm(self) -> Optional[Tuple[int, int]]:
        """(N, M) for an N:M ``pattern``, None for unstructured masks."""
        return parse_pattern(self.pattern)

    @property
    def channel_multiple(self) -> int:
        """What Sparse Wide rounds widened channels to: ``round_to``, and M of an N:M ``pattern`` too."""
        nm = self.nm
        return self.round_to if nm is None else math.lcm(self.round_to, nm[1])

    @property
    def density(self) -> float:
        return 1.0 - self.sparsity

    @property
    def iso_flop(self) -> bool:
        """Is the result meant to cost what the dense model does? (not for "none", a latency
        budget, an explicit capacity, or a transform registered as not iso-FLOP)"""
        return (get_transform(self.transform).iso_flop and self.budget == "flops" and self.capacity is None
                and self.nm is None)


@dataclass(frozen=True)
class CompileOptions:
    """How to run a compilation, beside what it makes (the `CompileConfig`, which a result keeps).

    ``capture_method``: "auto", "fx" or "export" (`capture.capture`); ``output``: "auto", "native" or
    "graph" (`sift_compiler.compile`); ``progress``: a stream for per-pass progress lines;
    ``model_name`` and ``source`` (how to rebuild the dense model) go into the report and the saved
    plan; ``runtime`` and ``latency`` (a `latency.LatencyBudget`) drive the iso-latency search.
    """

    capture_method: str = "auto"
    output: str = "auto"
    progress: Optional[TextIO] = None
    model_name: str = ""
    source: Optional[Dict[str, Any]] = None
    runtime: Optional[str] = None
    latency: Optional[Any] = None

    def __post_init__(self) -> None:
        if self.output not in OUTPUTS:
            raise UserInputError(f"output must be one of {', '.join(OUTPUTS)}, got {self.output!r}")


def config_of(module: Any) -> Optional[CompileConfig]:
    """The `CompileConfig` a module was compiled with, or None for a model sift did not compile.

    Read from the ``sift_config`` attribute (kept by ``torch.save``) or from a GraphModule's
    ``meta["sift_config"]`` (kept by ``copy.deepcopy``, which drops extra attributes).
    """
    config = getattr(module, "sift_config", None)
    if config is None:
        meta = getattr(module, "meta", None)
        config = meta.get("sift_config") if isinstance(meta, dict) else None
    return config if isinstance(config, CompileConfig) else None


def attach_config(module: Any, config: CompileConfig) -> None:
    """Record ``config`` on ``module`` so that it survives both deepcopy and torch.save (see `config_of`)."""
    module.sift_config = config
    meta = getattr(module, "meta", None)
    if isinstance(meta, dict):
        meta["sift_config"] = config


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
