"""Analyses computed once per graph generation and shared by passes (MLIR's model).

``unit.analyses.get(ShapeAnalysis)`` computes the result on first use and caches it by class,
stamped with ``unit.generation``. A pass that edits the graph bumps the generation (mask edits
bump it by themselves: `unit`); after the pass, the pass manager calls
``invalidate(preserved, start_generation)``: everything the pass did not declare preserved is
dropped, and a preserved result is re-stamped as current only if it was current when the pass
started (a result that was already stale stays stale). A result read at another generation than
its stamp is recomputed.
"""
from __future__ import annotations

from typing import Any, Dict, FrozenSet, Generic, Optional, Protocol, Set, Type, TypeVar

R = TypeVar("R")


class CompilationUnit(Protocol):
    """What analyses read of a `unit.CompilationUnit` (a layer above them): its graph and generation."""

    module: Any
    config: Any

    @property
    def generation(self) -> int: ...


class Analysis(Generic[R]):
    """Base class: subclasses implement ``run(unit) -> result``; results should be read-only.

    Unlike a pass, an analysis reads the options it depends on from ``unit.config`` (`LayerAnalysis`:
    ``keep_dense``; `ChannelCouplingAnalysis`: ``attention_width``): the unit is what it analyses, and
    its config is part of it, so the one result cached for the unit (by class, as passes name what
    they preserve) is the same for every pass and for the baseline. Options given by the callers
    instead would have every caller repeat them and two callers that differ see two layer tables of
    one unit."""

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
        self._watching: Optional[Set[type]] = None
        # analyses the last pass's postcondition computed: they describe the unit as the pass left it
        self.postcondition: FrozenSet[type] = frozenset()

    def get(self, analysis: Type[Analysis[R]]) -> R:
        cached = self._cache.get(analysis)
        if cached is not None and cached[0] == self._unit.generation:
            return cached[1]
        result = analysis.run(self._unit)
        self._cache[analysis] = (self._unit.generation, result)
        if self._watching is not None:
            self._watching.add(analysis)
        self.computed[analysis.name] = self.computed.get(analysis.name, 0) + 1
        return result

    def watch(self) -> None:
        """Start noting which analyses are computed (a pass's ``ensures`` is about to run)."""
        self._watching = set()

    def stop_watching(self) -> None:
        """What was computed since `watch` becomes ``postcondition`` (read by the pass manager)."""
        self.postcondition, self._watching = frozenset(self._watching or ()), None

    def cached(self) -> FrozenSet[type]:
        """The analyses with a result cached, current or not."""
        return frozenset(self._cache)

    def is_current(self, analysis: type) -> bool:
        """Is a result of ``analysis`` cached for the unit as it is now?"""
        cached = self._cache.get(analysis)
        return cached is not None and cached[0] == self._unit.generation

    def invalidate(self, preserved: FrozenSet[type] = frozenset(), start_generation: Optional[int] = None,
                   current: FrozenSet[type] = frozenset()) -> None:
        """Drop every result except ``preserved`` ones computed at ``start_generation``, re-stamped as current,
        and ``current`` ones computed at the generation of now.

        ``start_generation``: the unit's generation when the pass began; a preserved result from an
        older generation was stale before the pass and is dropped too. None: the current
        generation (nothing is re-stamped across an edit). ``current``: results computed after
        the pass's ``call`` returned (by its ``ensures``): they saw the unit as the pass left it,
        edits it did not report included.
        """
        now = self._unit.generation
        start = now if start_generation is None else start_generation
        for analysis in list(self._cache):
            stamp, result = self._cache[analysis]
            if analysis in preserved and stamp == start:
                self._cache[analysis] = (now, result)
            elif analysis in current and stamp == now:
                continue
            else:
                del self._cache[analysis]
