"""The pass library: each Sparse-IFT transform is a pass usable on its own.

>>> unit = CompilationUnit(captured_graph_module, (x,), config=CompileConfig("parallel", 0.75))
>>> PassManager([SparseParallelPass(0.75, defer_init=True), IsoFlopCompensationPass(CompensationOptions(0.75)),
...              InitMasksPass(InitOptions(seed=0))]).run(unit)

A pass takes its options when it is built (`pipelines` makes them from the `CompileConfig`); it
never reads ``unit.config``.
"""
from .base import Pass, PassInstrument, PassManager, PassResult, ProgressInstrument, TimingInstrument
from .compensate import IsoFlopCompensationPass
from .init_masks import InitMasksPass
from .sparse_doped import DopedLayer, SparseDopedPass
from .sparse_factorized import FactorizedLayer, SparseFactorizedPass
from .sparse_parallel import ParallelBranches, SparseBranch, SparseParallelPass
from .verify import VerifyPass

__all__ = ["Pass", "PassInstrument", "PassManager", "PassResult", "ProgressInstrument", "TimingInstrument",
           "IsoFlopCompensationPass", "InitMasksPass", "SparseDopedPass", "DopedLayer", "SparseFactorizedPass",
           "FactorizedLayer", "SparseParallelPass", "ParallelBranches", "SparseBranch", "VerifyPass"]
