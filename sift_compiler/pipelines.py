"""Named pipelines: a transform name -> the list of passes that implements it.

``get_pipeline("sparse-parallel")(config)`` returns a `PassManager`. Register new ones with
``@register_pipeline("my-name")`` on a function ``config -> list[Pass]``; duplicates are refused
and unknown names get the list of valid ones.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence

from .config import CompileConfig
from .errors import UserInputError
from .passes.base import Pass, PassInstrument, PassManager
from .passes.compensate import IsoFlopCompensationPass
from .passes.init_masks import InitMasksPass
from .passes.sparse_doped import SparseDopedPass
from .passes.sparse_factorized import SparseFactorizedPass
from .passes.sparse_parallel import SparseParallelPass
from .passes.sparse_wide import SparseWidePass
from .passes.verify import VerifyPass

PipelineFactory = Callable[[CompileConfig], List[Pass]]
_PIPELINES: Dict[str, PipelineFactory] = {}

# CLI transform name -> pipeline name
TRANSFORM_PIPELINES = {"none": "dense-baseline", "parallel": "sparse-parallel", "factorized": "sparse-factorized",
                       "doped": "sparse-doped", "wide": "sparse-wide"}


def register_pipeline(name: str) -> Callable[[PipelineFactory], PipelineFactory]:
    def register(factory: PipelineFactory) -> PipelineFactory:
        if name in _PIPELINES:
            raise ValueError(f"pipeline {name!r} is already registered")
        _PIPELINES[name] = factory
        return factory
    return register


def pipeline_names() -> List[str]:
    return sorted(_PIPELINES)


def get_pipeline(name: str, config: CompileConfig, instruments: Sequence[PassInstrument] = ()) -> PassManager:
    """The named pipeline built for ``config``."""
    if name not in _PIPELINES:
        raise UserInputError(f"unknown pipeline {name!r}; known: {', '.join(pipeline_names())}")
    return PassManager(_PIPELINES[name](config), name=name, instruments=instruments)


def _finish() -> List[Pass]:
    # the rewrites run with defer_init=True: InitMasksPass draws their weights after their masks
    return [IsoFlopCompensationPass(), InitMasksPass(), VerifyPass()]


@register_pipeline("dense-baseline")
def dense_baseline_pipeline(config: CompileConfig) -> List[Pass]:
    return [VerifyPass()]


@register_pipeline("sparse-parallel")
def sparse_parallel_pipeline(config: CompileConfig) -> List[Pass]:
    return [SparseParallelPass(config.sparsity, defer_init=True, capacity=config.capacity), *_finish()]


@register_pipeline("sparse-factorized")
def sparse_factorized_pipeline(config: CompileConfig) -> List[Pass]:
    return [SparseFactorizedPass(config.sparsity, defer_init=True, capacity=config.capacity), *_finish()]


@register_pipeline("sparse-doped")
def sparse_doped_pipeline(config: CompileConfig) -> List[Pass]:
    return [SparseDopedPass(config.sparsity, defer_init=True, capacity=config.capacity), *_finish()]


@register_pipeline("sparse-wide")
def sparse_wide_pipeline(config: CompileConfig) -> List[Pass]:
    return [SparseWidePass(config.sparsity, config.round_to, defer_init=True, factor=config.capacity), *_finish()]
