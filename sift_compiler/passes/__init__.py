"""The pass library: each Sparse-IFT transform is a pass usable on its own.

>>> unit = CompilationUnit(captured_graph_module, (x,), config=CompileConfig("parallel", 0.75))
>>> PassManager([SparseParallelPass(0.75), IsoFlopCompensationPass(), InitMasksPass()]).run(unit)
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
