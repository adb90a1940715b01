"""The pass contract and the pass manager.

A pass works in place on a `CompilationUnit`: ``requires`` -> ``call`` -> ``ensures``.
``call`` returns a `PassResult` saying, honestly, whether it changed anything and which analyses
it preserved (none by default, as in MLIR). The manager invalidates the rest, runs instruments
around each pass, and re-raises failures with the pass name and the passes that ran before.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, FrozenSet, Sequence

from ..errors import PassError, PostconditionError, PreconditionError, SiftError

if TYPE_CHECKING:
    from ..unit import CompilationUnit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PassResult:
    modified: bool
    preserved: FrozenSet[type] = frozenset()


class Pass:
    """Base class. Subclasses set ``name`` and implement ``call``; ``requires``/``ensures`` raise
    `PassError` (or return None) to state pre- and postconditions."""

    name = "pass"

    def requires(self, unit: "CompilationUnit") -> None:
        """Raise PassError if ``unit`` is not something this pass can run on."""

    def call(self, unit: "CompilationUnit") -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def ensures(self, unit: "CompilationUnit") -> None:
        """Raise PassError if the pass left ``unit`` breaking an invariant."""

    def __call__(self, unit: "CompilationUnit") -> PassResult:
        history = list(unit.history)
        try:
            self.requires(unit)
        except PassError as e:
            raise PreconditionError(f"[{self.name}] precondition failed: {e}; after passes {history}") from e
        try:
            result = self.call(unit)
        except SiftError:
            raise
        except Exception as e:
            raise PassError(f"[{self.name}] failed: {type(e).__name__}: {e}; after passes {history}") from e
        if not isinstance(result, PassResult):
            raise TypeError(f"pass {self.name!r} returned {type(result).__name__}, not PassResult")
        try:
            self.ensures(unit)
        except PostconditionError:
            raise
        except PassError as e:
            raise PostconditionError(f"[{self.name}] postcondition failed: {e}; after passes {history}") from e
        return result

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class PassInstrument:
    """Hooks around each pass (timing, progress, dumps) kept out of pass bodies."""

    def run_before_pass(self, unit: "CompilationUnit", p: Pass) -> None:
        pass

    def run_after_pass(self, unit: "CompilationUnit", p: Pass, result: PassResult) -> None:
        pass


@dataclass
class TimingInstrument(PassInstrument):
    """Wall time of each pass, in seconds: ``timings['sparse-parallel']``."""

    timings: Dict[str, float] = field(default_factory=dict)
    _start: float = 0.0

    def run_before_pass(self, unit, p):
        self._start = time.perf_counter()

    def run_after_pass(self, unit, p, result):
        self.timings[p.name] = self.timings.get(p.name, 0.0) + time.perf_counter() - self._start


class ProgressInstrument(PassInstrument):
    """Prints one line per pass to a stream (the CLI's progress)."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def run_before_pass(self, unit, p):
        print(f"  running {p.name} ...", file=self.stream, flush=True)


class PassManager:
    """Runs passes in order on a unit; see the module docstring."""

    def __init__(self, passes: Sequence[Pass], name: str = "pipeline",
                 instruments: Sequence[PassInstrument] = ()) -> None:
        self.passes = list(passes)
        self.name = name
        self.instruments = list(instruments)

    def run(self, unit: "CompilationUnit") -> bool:
        modified = False
        for p in self.passes:
            for instrument in self.instruments:
                instrument.run_before_pass(unit, p)
            result = p(unit)
            unit.analyses.invalidate(result.preserved if result.modified else _everything(unit))
            unit.history.append(p.name)
            modified |= result.modified
            log.debug("%s: modified=%s", p.name, result.modified)
            for instrument in self.instruments:
                instrument.run_after_pass(unit, p, result)
        return modified

    def __repr__(self) -> str:
        return f"PassManager({self.name!r}, {[p.name for p in self.passes]})"


def _everything(unit: "CompilationUnit") -> FrozenSet[type]:
    return frozenset(unit.analyses._cache)
