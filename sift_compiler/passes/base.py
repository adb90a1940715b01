"""The pass contract and the pass manager.

A pass works in place on a `CompilationUnit`: ``requires`` -> ``call`` -> ``ensures``.
``call`` returns a `PassResult` saying, honestly, whether it changed anything and which analyses
it preserved (none by default, as in MLIR). The manager invalidates the rest, runs instruments
around each pass, and re-raises failures with the pass name and the passes that ran before.

The contract enforces itself:

* ``modified=False`` while the unit's generation moved (a graph edit, or any mask tensor edited
  or replaced) is a `PassError` naming the pass: a pass cannot lie about what it changed;
* a preserved analysis is re-stamped only if it was current when the pass started;
* any error raised in ``requires``/``call``/``ensures`` reaches the user with the pass name, the
  passes before it, and the node (with its source line) where the pass recorded one
  (`errors.at_node`). A `SiftError` keeps its class (the context goes into its message, see
  `errors.add_pass_context`); anything else becomes a `PassError`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Sequence

from ..errors import PassError, PostconditionError, PreconditionError, SiftError, add_pass_context, pass_error
from ..unit import CompilationUnit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PassResult:
    """What a pass did: whether it changed the unit, and which analyses stay valid if it did."""

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
        self._check("precondition", self.requires, unit, history, PreconditionError)
        start = unit.generation
        try:
            result = self.call(unit)
        except SiftError as e:  # keeps its class: the user (and the CLI's exit code) still see what it is
            raise add_pass_context(e, self.name, history)
        except Exception as e:
            raise pass_error(self.name, getattr(e, "sift_node", None), f"failed: {type(e).__name__}: {e}",
                             history) from e
        if not isinstance(result, PassResult):
            raise TypeError(f"pass {self.name!r} returned {type(result).__name__}, not PassResult")
        if not result.modified and unit.generation != start:
            raise pass_error(self.name, None, "returned modified=False but changed the unit (its generation moved "
                             f"from {start} to {unit.generation}: a graph edit or a mask edit)", history)
        unit.analyses.watch()
        try:
            self._check("postcondition", self.ensures, unit, history, PostconditionError)
        finally:
            unit.analyses.stop_watching()
        return result

    def _check(self, what: str, condition, unit: "CompilationUnit", history: Sequence[str], cls: type) -> None:
        """Run ``requires`` or ``ensures``; whatever it raises reaches the user with this pass's context,
        as an error in ``call`` does: a `SiftError` keeps its class, a `PassError` becomes ``cls``
        (Pre-/PostconditionError), anything else a ``cls`` that names its type."""
        try:
            condition(unit)
        except cls as e:
            raise add_pass_context(e, self.name, history)
        except PassError as e:
            raise pass_error(self.name, getattr(e, "sift_node", None), f"{what} failed: {e}", history, cls) from e
        except SiftError as e:
            raise add_pass_context(e, self.name, history)
        except Exception as e:
            raise pass_error(self.name, getattr(e, "sift_node", None), f"{what} failed: {type(e).__name__}: {e}",
                             history, cls) from e

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
    """Runs passes in order on a unit, once; see the module docstring."""

    def __init__(self, passes: Sequence[Pass], name: str = "pipeline",
                 instruments: Sequence[PassInstrument] = ()) -> None:
        self.passes = list(passes)
        self.name = name
        self.instruments = list(instruments)

    def run(self, unit: "CompilationUnit") -> bool:
        """Run the pipeline; True if any pass modified the unit."""
        modified = False
        for p in self.passes:
            for instrument in self.instruments:
                instrument.run_before_pass(unit, p)
            start = unit.generation
            result = p(unit)
            unit.analyses.invalidate(result.preserved if result.modified else _everything(unit), start,
                                     current=unit.analyses.postcondition)
            unit.history.append(p.name)
            modified |= result.modified
            log.debug("%s: modified=%s", p.name, result.modified)
            for instrument in self.instruments:
                instrument.run_after_pass(unit, p, result)
        return modified

    def __repr__(self) -> str:
        return f"PassManager({self.name!r}, {[p.name for p in self.passes]})"


def _everything(unit: "CompilationUnit") -> FrozenSet[type]:
    return unit.analyses.cached()
