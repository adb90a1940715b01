"""Iso-latency: the largest transform whose measured latency on a runtime meets the dense model's.

The paper holds FLOPs equal; on a real runtime equal FLOPs are not equal time (DeepSparse runs
Sparse-IFT ResNet-18 at 90% at about 2x the dense latency). ``budget="latency"`` instead keeps the
sparse layers at the requested s (no compensation) and searches the transform's size, its
*capacity* (`CompileConfig.capacity`: Wide's k, Parallel's B, Factorized's h and Doped's r as
multiples of their iso-FLOP values), for the largest one whose latency is at most ``ratio`` times
the dense model's:

1. compile and export the dense model once; keep it compiled on the runtime for the whole search;
2. measure a capacity: compile at that capacity, export, compile on the runtime, then time dense
   and candidate in interleaved rounds (dense, candidate, dense, candidate, ...; timing loops in
   the engine's process); the latency ratio is the median over rounds of the ratio of the
   round's medians, so load that comes and goes hits both alike;
3. bracket: the smallest capacity (k = 1, B = 1, 0.1 x h or r) must meet the budget, the iso-FLOP
   capacity usually does not; if it does, grow by 1.5x until one fails (at most ``max_capacity``);
4. bisect between them (latency grows with capacity), integers for B, until the bracket is within
   ``tolerance`` or ``max_steps`` measurements were made; the answer is the largest capacity that
   met the budget, with its measured latency ratio and FLOP ratio (weight layers, sift/dense).

>>> result = sift.compile(model, "wide", 0.9, (x,), budget="latency", runtime="deepsparse",
...                       latency=sift.latency.LatencyBudget(batch_size=16))
>>> print(result.latency.table())     # every measurement; result.report: the chosen model
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, TextIO

import numpy as np

from .errors import ExportError, UserInputError
from .exporters.inputs import input_specs, random_feeds
from .exporters.onnx import export_onnx
from .exporters.runtimes import deepsparse_status, open_engine
from .exporters.weights import load_onnx
from .registry import get_transform

RUNTIMES = ("deepsparse", "onnxruntime")


@dataclass(frozen=True)
class LatencyBudget:
    """How the search measures: batch, budget (latency at most ``ratio`` x dense), rounds and limits."""

    batch_size: int = 1
    ratio: float = 1.0
    rounds: int = 5              # interleaved rounds per measurement (dense and candidate each round)
    iterations: int = 5          # timed batches per model per round
    warmup: int = 1              # untimed batches per model per round
    num_cores: Optional[int] = None
    max_steps: int = 8           # measurements after the bracket
    tolerance: float = 0.03      # stop when the bracket is within this fraction of its upper end
    max_capacity: Optional[float] = None  # the largest capacity tried (default: 4x the iso-FLOP one)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.rounds < 1 or self.iterations < 1 or self.warmup < 0 or self.max_steps < 1:
            raise UserInputError("latency budget: batch_size, rounds, iterations and max_steps must be >= 1, "
                                 "warmup >= 0")
        if not self.ratio > 0:
            raise UserInputError(f"latency budget ratio must be positive, got {self.ratio}")


@dataclass
class Probe:
    """One measured capacity: its latency against the dense model's (side by side) and its FLOPs."""

    capacity: float
    latency_ratio: float
    flop_ratio: float
    dense_ms: float
    sift_ms: float
    error: str = ""      # the runtime could not compile or run the candidate (it counts as over budget)

    def meets(self, ratio: float) -> bool:
        return self.latency_ratio <= ratio


@dataclass
class LatencySearch:
    """What the search found: the chosen capacity and every measurement behind it."""

    transform: str
    sparsity: float
    runtime: str
    budget: LatencyBudget
    iso_flop_capacity: float
    capacity: float
    latency_ratio: float
    flop_ratio: float
    probes: List[Probe] = field(default_factory=list)
    note: str = ""

    def table(self) -> str:
        b = self.budget
        rows = [f"iso-latency search: {self.transform} at s = {self.sparsity:g} on {self.runtime}, batch {b.batch_size}, "
                f"budget {b.ratio:g}x dense; {b.rounds} interleaved rounds x {b.iterations} batches per measurement",
                f"{'capacity':>10}  {'dense ms':>9}  {'sift ms':>9}  {'latency/dense':>13}  {'FLOPs/dense':>11}  meets"]
        for p in self.probes:
            rows.append(f"{p.capacity:>10.4g}  {p.dense_ms:>9.2f}  {p.sift_ms:>9.2f}  {p.latency_ratio:>13.3f}  "
                        f"{p.flop_ratio:>11.3f}  {'yes' if p.meets(b.ratio) else 'no'}"
                        + (f"  ({p.error})" if p.error else ""))
        rows.append(f"chosen capacity {self.capacity:g} (iso-FLOP: {self.iso_flop_capacity:.4g}): latency "
                    f"{self.latency_ratio:.3f}x dense, FLOPs {self.flop_ratio:.3f}x dense (weight layers)")
        if self.note:
            rows.append(f"note: {self.note}")
        return "\n".join(rows)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def capacity_rule(transform: str):
    """The transform's `pipelines.CapacityRule` (from the registry), or `UserInputError` if it has none."""
    rule = get_transform(transform).capacity
    if rule is None:
        raise UserInputError(f"budget='latency' needs a transform with a capacity to search, and {transform!r} has "
                             "none; register it with register_transform(..., capacity=CapacityRule(...))")
    return rule


def iso_flop_capacity(transform: str, sparsity: float) -> float:
    """The capacity the iso-FLOP formulas give (`CompileConfig.capacity` units)."""
    return capacity_rule(transform).iso_flop(sparsity)


def check_runtime(runtime: Optional[str]) -> str:
    """The runtime to measure on, usable here, or `UserInputError` saying why not."""
    if runtime not in RUNTIMES:
        raise UserInputError(f"budget='latency' needs runtime= one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "deepsparse":
        usable, reason = deepsparse_status()
        if not usable:
            raise UserInputError(f"iso-latency measures latency on DeepSparse, which cannot run here: {reason}")
    return runtime


class _Measurer:
    """Exports candidates and times them against the dense model, which stays compiled on the runtime."""

    def __init__(self, compile_at: Callable[[Optional[float]], Any], example_inputs, example_kwargs, runtime: str,
                 budget: LatencyBudget, log: Optional[TextIO]) -> None:
        self.compile_at, self.args, self.kwargs = compile_at, example_inputs, example_kwargs
        self.runtime, self.budget, self.log = runtime, budget, log
        self.dir = tempfile.mkdtemp(prefix="sift-latency-")
        dense_path = self._export(compile_at(None), "dense")
        self.feeds = random_feeds(input_specs(load_onnx(dense_path)), budget.batch_size, None, 0)
        self.shapes = [list(v.shape) for v in self.feeds.values()]
        self.dense = open_engine(runtime, dense_path, budget.batch_size, budget.num_cores, self.shapes)

    def _export(self, result, name: str) -> str:
        path = os.path.join(self.dir, f"{name}.onnx")
        # the form DeepSparse runs when it verifies the file (the exporter's default keeps it), unverified here:
        # the chosen model is verified when it is exported for real
        form = "branches" if self.runtime == "deepsparse" else "auto"
        export_onnx(result.module, self.args, path, self.kwargs, form=form, verify=False)
        return path

    def measure(self, capacity: float) -> Probe:
        result = self.compile_at(capacity)
        path = self._export(result, "candidate")
        b = self.budget
        dense_rounds, sift_rounds = [], []
        try:
            with open_engine(self.runtime, path, b.batch_size, b.num_cores, self.shapes) as engine:
                for _ in range(b.rounds):
                    dense_rounds.append(float(np.median(self.dense.time(self.feeds, b.warmup, b.iterations))))
                    sift_rounds.append(float(np.median(engine.time(self.feeds, b.warmup, b.iterations))))
        except ExportError as e:  # the runtime aborted or timed out on this candidate: over budget, say why
            if self.log:
                print(f"sift: capacity {capacity:.4g}: {e}", file=self.log, flush=True)
            return Probe(capacity, float("inf"), result.report.flop_ratio, float("nan"), float("nan"), str(e))
        finally:
            os.remove(path)
        ratio = float(np.median([s / d for s, d in zip(sift_rounds, dense_rounds)]))
        probe = Probe(capacity, ratio, result.report.flop_ratio, float(np.median(dense_rounds)),
                      float(np.median(sift_rounds)))
        if self.log:
            print(f"sift: capacity {capacity:.4g}: latency {ratio:.3f}x dense ({probe.sift_ms:.2f} / "
                  f"{probe.dense_ms:.2f} ms), FLOPs {probe.flop_ratio:.3f}x", file=self.log, flush=True)
        return probe

    def close(self) -> None:
        self.dense.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _middle(lo: float, hi: float, integer: bool) -> float:
    return float((int(lo) + int(hi)) // 2) if integer else math.sqrt(lo * hi)


def _narrow_enough(lo: float, hi: float, integer: bool, tolerance: float) -> bool:
    return hi - lo <= 1 if integer else (hi - lo) <= tolerance * hi


def search(transform: str, sparsity: float, compile_at: Callable[[Optional[float]], Any], example_inputs,
           example_kwargs, runtime: str, budget: LatencyBudget, log: Optional[TextIO] = None,
           measured: Optional[Dict[float, Probe]] = None) -> LatencySearch:
    """Bracket and bisect the capacity (module docstring); ``compile_at(None)`` is the dense model.

    ``measured``: probes of earlier searches of the same model, transform, runtime and batch (e.g.
    for other budget ratios), reused instead of measured again; new probes are added to it.
    """
    rule = capacity_rule(transform)
    integer = rule.whole
    iso = rule.iso_flop(sparsity)
    cap = budget.max_capacity or 4.0 * iso
    measured = {} if measured is None else measured
    measurer: Optional[_Measurer] = None
    probes: List[Probe] = []
    try:
        def probe(capacity: float) -> Probe:
            nonlocal measurer
            if capacity not in measured:
                if measurer is None:
                    measurer = _Measurer(compile_at, example_inputs, example_kwargs, runtime, budget, log)
                measured[capacity] = measurer.measure(capacity)
            probes.append(measured[capacity])
            return probes[-1]
        low = probe(rule.smallest)
        if not low.meets(budget.ratio):
            return _answer(transform, sparsity, runtime, budget, iso, probes, low,
                           f"even the smallest capacity ({low.capacity:g}) is {low.latency_ratio:.3f}x the dense "
                           f"latency, over the budget {budget.ratio:g}x: it is the answer")
        lo, hi = low.capacity, min(max(iso, low.capacity * 1.5), cap)
        while True:  # grow until a capacity fails the budget
            p = probe(hi)
            if not p.meets(budget.ratio):
                break
            lo = hi
            if hi >= cap:
                return _answer(transform, sparsity, runtime, budget, iso, probes, p,
                               f"the largest capacity tried ({cap:g}) meets the budget")
            hi = min(cap, math.ceil(hi * 1.5) if integer else hi * 1.5)
        for _ in range(budget.max_steps):
            if _narrow_enough(lo, hi, integer, budget.tolerance):
                break
            mid = _middle(lo, hi, integer)
            if probe(mid).meets(budget.ratio):
                lo = mid
            else:
                hi = mid
        best = max((p for p in probes if p.meets(budget.ratio)), key=lambda p: p.capacity)
        failed = [p for p in probes if p.error]
        if failed:
            return _answer(transform, sparsity, runtime, budget, iso, probes, best,
                           f"{len(failed)} candidates could not run (counted as over budget): {failed[0].error}")
        return _answer(transform, sparsity, runtime, budget, iso, probes, best, "")
    finally:
        if measurer is not None:
            measurer.close()


def _answer(transform, sparsity, runtime, budget, iso, probes, chosen: Probe, note: str) -> LatencySearch:
    return LatencySearch(transform, sparsity, runtime, budget, iso, chosen.capacity, chosen.latency_ratio,
                         chosen.flop_ratio, list(probes), note)


__all__ = ["LatencyBudget", "LatencySearch", "Probe", "search", "iso_flop_capacity",
           "check_runtime", "RUNTIMES"]
