"""The named pipelines: the built-in transforms' pass lists, and the `PassManager` that runs them.

A *pipeline* is a function ``config -> list[Pass]``; ``get_pipeline("sparse-parallel", config)``
returns a `PassManager`. The transform registry (`registry`: `register_transform`,
`register_pipeline`, `get_transform`, re-exported here) maps each transform to its pipeline; the
built-in transforms are registered at the end of this module.

Pipelines build their passes from frozen option objects made from the `CompileConfig`
(`RewriteOptions`, `CompensationOptions`, `InitOptions`, `VerifyOptions`), not from the global
``unit.config``.
"""
from __future__ import annotations

from typing import Callable, List, Sequence

from .config import CompileConfig
from .passes.base import Pass, PassInstrument, PassManager
from .passes.compensate import CompensationOptions, IsoFlopCompensationPass
from .passes.init_masks import InitMasksPass, InitOptions
from .passes.rewrite import RewriteOptions
from .passes.sparse_doped import SparseDopedPass
from .passes.sparse_factorized import SparseFactorizedPass
from .passes.sparse_parallel import SparseParallelPass, num_branches
from .passes.sparse_wide import SparseWidePass, widening_factor
from .passes.verify import VerifyOptions, VerifyPass
from .registry import (CapacityRule, PipelineFactory, TransformSpec, get_transform, pipeline_factory,  # noqa: F401
                       pipeline_names, register_pipeline, register_transform, transform_names, transforms_help)


def pipeline_for(config: CompileConfig, instruments: Sequence[PassInstrument] = ()) -> PassManager:
    """The pipeline of ``config.transform``, built for ``config``."""
    spec = get_transform(config.transform)
    return PassManager(spec.passes(config), name=spec.pipeline, instruments=instruments)


def get_pipeline(name: str, config: CompileConfig, instruments: Sequence[PassInstrument] = ()) -> PassManager:
    """The named pipeline built for ``config``."""
    return PassManager(pipeline_factory(name)(config), name=name, instruments=instruments)


def finish_passes(config: CompileConfig) -> List[Pass]:
    """What every rewrite pipeline ends with: compensation, mask and weight draws, verification.

    The rewrites run with defer_init=True: InitMasksPass draws their weights after their masks.
    """
    return [IsoFlopCompensationPass(CompensationOptions.of(config)), InitMasksPass(InitOptions.of(config)),
            VerifyPass(VerifyOptions.of(config))]


@register_pipeline("dense-baseline")
def dense_baseline_pipeline(config: CompileConfig) -> List[Pass]:
    return [VerifyPass(VerifyOptions.of(config))]


def rewrite_pipeline(make_rewrite: Callable[[RewriteOptions], Pass]) -> PipelineFactory:
    """A pipeline factory: the rewrite ``make_rewrite`` builds from the config's `RewriteOptions`,
    then `finish_passes` (what the four built-in transforms are, and a user's usually is)."""
    def factory(config: CompileConfig) -> List[Pass]:
        return [make_rewrite(RewriteOptions.of(config)), *finish_passes(config)]
    return factory


sparse_parallel_pipeline = register_pipeline("sparse-parallel")(rewrite_pipeline(
    lambda o: SparseParallelPass(o.sparsity, defer_init=o.defer_init, capacity=o.capacity, options=o)))
sparse_factorized_pipeline = register_pipeline("sparse-factorized")(rewrite_pipeline(
    lambda o: SparseFactorizedPass(o.sparsity, defer_init=o.defer_init, capacity=o.capacity, options=o)))
sparse_doped_pipeline = register_pipeline("sparse-doped")(rewrite_pipeline(
    lambda o: SparseDopedPass(o.sparsity, defer_init=o.defer_init, capacity=o.capacity, options=o)))
sparse_wide_pipeline = register_pipeline("sparse-wide")(rewrite_pipeline(
    lambda o: SparseWidePass(o.sparsity, o.round_to, defer_init=o.defer_init, factor=o.capacity, options=o,
                                kernel_head_dims=o.kernel_head_dims)))


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
