"""Analyses computed once per graph generation and shared by passes (MLIR's model).

``unit.analyses.get(ShapeAnalysis)`` computes the result on first use and caches it by class.
A pass that edits the graph bumps ``unit.generation``; after the pass, the pass manager calls
``invalidate(preserved)`` and everything the pass did not declare preserved is dropped. A result
read after its graph changed, without the pass declaring it preserved, is recomputed.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, FrozenSet, Generic, Type, TypeVar

if TYPE_CHECKING:
    from ..unit import CompilationUnit

R = TypeVar("R")


class Analysis(Generic[R]):
    """Base class: subclasses implement ``run(unit) -> result``; results should be read-only."""

    name = "analysis"

    @classmethod
    def run(cls, unit: "CompilationUnit") -> R:  # pragma: no cover - abstract
        raise NotImplementedError


class AnalysisManager:
    """Per-unit cache of analysis results, keyed by analysis class and stamped with a generation."""

    def __init__(self, unit: "CompilationUnit") -> None:
        self._unit = unit
        self._cache: Dict[type, tuple] = {}  # class -> (generation, result)
        self.computed: Dict[str, int] = {}   # how many times each analysis ran (for tests and timing)

    def get(self, analysis: Type[Analysis[R]]) -> R:
        cached = self._cache.get(analysis)
        if cached is not None and cached[0] == self._unit.generation:
            return cached[1]
        result = analysis.run(self._unit)
        self._cache[analysis] = (self._unit.generation, result)
        self.computed[analysis.name] = self.computed.get(analysis.name, 0) + 1
        return result

    def invalidate(self, preserved: FrozenSet[type] = frozenset()) -> None:
        """Drop every result except ``preserved`` ones, which are re-stamped as current."""
        for analysis in list(self._cache):
            if analysis in preserved:
                self._cache[analysis] = (self._unit.generation, self._cache[analysis][1])
            else:
                del self._cache[analysis]
