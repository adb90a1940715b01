"""The transform registry and the named pipelines behind it.

A *pipeline* is a name -> a function ``config -> list[Pass]``: ``get_pipeline("sparse-parallel",
config)`` returns a `PassManager`. Register new ones with ``@register_pipeline("my-name")``.

A *transform* is what users name (``sift.compile(model, "parallel", ...)``, ``sift-compile
--transform parallel``): `register_transform` maps it to a pipeline, its main pass class and a
one-line summary. This one table feeds `CompileConfig` validation, the CLIs' ``--transform``
choices and help, `compile`, the exporters and `load`; a transform a user registers is reachable
from all of them. Duplicates are refused and unknown names get the list of valid ones.

Pipelines build their passes from frozen option objects made from the `CompileConfig`
(`RewriteOptions`, `CompensationOptions`, `InitOptions`, `VerifyOptions`), not from the global
``unit.config``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

from .config import CompileConfig
from .errors import UserInputError
from .passes.base import Pass, PassInstrument, PassManager
from .passes.compensate import CompensationOptions, IsoFlopCompensationPass
from .passes.init_masks import InitMasksPass, InitOptions
from .passes.rewrite import RewriteOptions
from .passes.sparse_doped import SparseDopedPass
from .passes.sparse_factorized import SparseFactorizedPass
from .passes.sparse_parallel import SparseParallelPass, num_branches
from .passes.sparse_wide import SparseWidePass, widening_factor
from .passes.verify import VerifyOptions, VerifyPass

PipelineFactory = Callable[[CompileConfig], List[Pass]]
_PIPELINES: Dict[str, PipelineFactory] = {}


@dataclass(frozen=True)
class CapacityRule:
    """What a transform's ``capacity`` (`CompileConfig.capacity`) means, for the iso-latency search.

    ``iso_flop(s)`` is the capacity the iso-FLOP formula gives at sparsity s; ``whole`` says the
    capacity is a whole number (Parallel's branches); ``smallest`` is where the search starts.
    """

    iso_flop: Callable[[float], float]
    whole: bool = False
    smallest: float = 0.1


@dataclass(frozen=True)
class TransformSpec:
    """One row of the transform registry (see the module docstring)."""

    name: str                          # what users type: "parallel"
    pipeline: str                      # the registered pipeline that implements it: "sparse-parallel"
    main_pass: Optional[type] = None   # the rewrite pass class (None: no rewrite, e.g. "none")
    summary: str = ""                  # one line for --help
    iso_flop: bool = True              # VerifyPass checks the result costs what the dense model does
    capacity: Optional[CapacityRule] = None   # None: no capacity, so no budget="latency" search

    @property
    def rule(self) -> Optional[str]:
        """The ``sift.rule`` its rewrite stamps on the nodes it makes: the main pass's name (None: no rewrite)."""
        return getattr(self.main_pass, "name", None) if self.main_pass is not None else None

    @property
    def export_forms(self) -> bool:
        """Whether its results have export forms (`exporters.forms`): its main pass says so (``export_forms``)."""
        return bool(getattr(self.main_pass, "export_forms", False))


_TRANSFORMS: Dict[str, TransformSpec] = {}
# transform name -> pipeline name: a live view of the registry, for older callers
TRANSFORM_PIPELINES: Dict[str, str] = {}


def register_transform(name: str, pipeline: str, main_pass: Optional[type] = None, summary: str = "",
                       iso_flop: bool = True, capacity: Optional[CapacityRule] = None) -> TransformSpec:
    """Make ``name`` a transform: ``sift.compile(model, name, ...)`` and ``sift-compile -t name`` run ``pipeline``.

    ``pipeline`` must be registered (`register_pipeline`); ``iso_flop=False`` skips the iso-FLOP
    check of `VerifyPass` for this transform; ``capacity`` (a `CapacityRule`) lets
    ``budget="latency"`` search its size.
    """
    if name in _TRANSFORMS:
        raise ValueError(f"transform {name!r} is already registered")
    if pipeline not in _PIPELINES:
        raise UserInputError(f"transform {name!r}: unknown pipeline {pipeline!r}; known: {', '.join(pipeline_names())}")
    spec = TransformSpec(name, pipeline, main_pass, summary, iso_flop, capacity)
    _TRANSFORMS[name] = spec
    TRANSFORM_PIPELINES[name] = pipeline
    return spec


def transform_names() -> List[str]:
    """The registered transform names, built-in ones first (in registration order)."""
    return list(_TRANSFORMS)


def get_transform(name: str) -> TransformSpec:
    """The registry row of transform ``name``."""
    if name not in _TRANSFORMS:
        raise UserInputError(f"unknown transform {name!r}: choose one of {', '.join(transform_names())}")
    return _TRANSFORMS[name]


def transforms_help() -> str:
    """'none: ..., parallel: ...': the registry's summaries, for the CLIs' --transform help."""
    return "; ".join(f"{t.name}: {t.summary}" if t.summary else t.name for t in _TRANSFORMS.values())


def pipeline_for(config: CompileConfig, instruments: Sequence[PassInstrument] = (), steps: int = 1) -> PassManager:
    """The pipeline of ``config.transform``, built for ``config``."""
    spec = get_transform(config.transform)
    manager = get_pipeline(spec.pipeline, config, instruments)
    manager.steps = steps
    return manager


def register_pipeline(name: str) -> Callable[[PipelineFactory], PipelineFactory]:
    """Decorator: register ``factory`` (``config -> list[Pass]``) as pipeline ``name``."""
    def register(factory: PipelineFactory) -> PipelineFactory:
        if name in _PIPELINES:
            raise ValueError(f"pipeline {name!r} is already registered")
        _PIPELINES[name] = factory
        return factory
    return register


def pipeline_names() -> List[str]:
    """The registered pipeline names, sorted."""
    return sorted(_PIPELINES)


def get_pipeline(name: str, config: CompileConfig, instruments: Sequence[PassInstrument] = ()) -> PassManager:
    """The named pipeline built for ``config``."""
    if name not in _PIPELINES:
        raise UserInputError(f"unknown pipeline {name!r}; known: {', '.join(pipeline_names())}")
    return PassManager(_PIPELINES[name](config), name=name, instruments=instruments)


def finish_passes(config: CompileConfig) -> List[Pass]:
    """What every rewrite pipeline ends with: compensation, mask and weight draws, verification.

    The rewrites run with defer_init=True: InitMasksPass draws their weights after their masks.
    """
    return [IsoFlopCompensationPass(CompensationOptions.of(config)), InitMasksPass(InitOptions.of(config)),
            VerifyPass(VerifyOptions.of(config))]


@register_pipeline("dense-baseline")
def dense_baseline_pipeline(config: CompileConfig) -> List[Pass]:
    return [VerifyPass(VerifyOptions.of(config))]


@register_pipeline("sparse-parallel")
def sparse_parallel_pipeline(config: CompileConfig) -> List[Pass]:
    o = RewriteOptions.of(config)
    return [SparseParallelPass(o.sparsity, defer_init=o.defer_init, capacity=o.capacity, options=o),
            *finish_passes(config)]


@register_pipeline("sparse-factorized")
def sparse_factorized_pipeline(config: CompileConfig) -> List[Pass]:
    o = RewriteOptions.of(config)
    return [SparseFactorizedPass(o.sparsity, defer_init=o.defer_init, capacity=o.capacity, options=o),
            *finish_passes(config)]


@register_pipeline("sparse-doped")
def sparse_doped_pipeline(config: CompileConfig) -> List[Pass]:
    o = RewriteOptions.of(config)
    return [SparseDopedPass(o.sparsity, defer_init=o.defer_init, capacity=o.capacity, options=o),
            *finish_passes(config)]


@register_pipeline("sparse-wide")
def sparse_wide_pipeline(config: CompileConfig) -> List[Pass]:
    o = RewriteOptions.of(config)
    return [SparseWidePass(o.sparsity, o.round_to, defer_init=o.defer_init, factor=o.capacity, options=o,
                           kernel_head_dims=o.kernel_head_dims),
            *finish_passes(config)]


register_transform("none", "dense-baseline", None, "the dense baseline (no rewrite)", iso_flop=False)
# capacities: Parallel's B and Wide's k as such; Factorized's h and Doped's r as multiples of their iso-FLOP size
register_transform("parallel", "sparse-parallel", SparseParallelPass, "B sparse branches summed",
                   capacity=CapacityRule(lambda s: float(num_branches(s)), whole=True, smallest=1.0))
register_transform("factorized", "sparse-factorized", SparseFactorizedPass, "W -> U sigma V, sparse factors",
                   capacity=CapacityRule(lambda s: 1.0))
register_transform("doped", "sparse-doped", SparseDopedPass, "a dense low-rank UV plus a sparse M",
                   capacity=CapacityRule(lambda s: 1.0))
register_transform("wide", "sparse-wide", SparseWidePass, "sparse layers k times wider",
                   capacity=CapacityRule(widening_factor, smallest=1.0))
