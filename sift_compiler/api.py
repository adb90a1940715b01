"""The Python API: `compile` and `flops` (re-exported by `sift_compiler`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, TextIO, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from .analyses.flops import FlopAnalysis
from .analyses.layers import LayerAnalysis
from .analyses.shapes import ShapeAnalysis
from .capture.tracer import capture
from .config import CompileConfig
from .passes.base import ProgressInstrument, TimingInstrument
from .pipelines import TRANSFORM_PIPELINES, get_pipeline
from .report import FlopReport, build_report
from .shortfall import check_as_asked
from .unit import CompilationUnit


@dataclass
class CompileResult:
    """What `compile` returns: the trainable module, its FLOP report and how it was made."""

    module: fx.GraphModule
    report: FlopReport
    unit: CompilationUnit
    config: CompileConfig
    capture_method: str
    timings: Dict[str, float]
    source: Optional[Dict[str, Any]] = None  # how to rebuild the dense model (for save/load)

    def save(self, path: str) -> None:
        """Write the compiled model so that `sift_compiler.load` restores it (see serialize.py)."""
        from .serialize import save
        save(self, path)


def _as_tuple(example_inputs: Any) -> Tuple[Any, ...]:
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def compile(model: nn.Module, transform: str = "parallel", sparsity: float = 0.75,
            example_inputs: Any = (), example_kwargs: Optional[Dict[str, Any]] = None, *,
            seed: int = 0, keep_dense: Sequence[str] = (), activation: str = "auto", linear_norm: bool = False,
            round_to: int = 1, attention_width: str = "keep", capture_method: str = "auto",
            progress: Optional[TextIO] = None, model_name: str = "", source: Optional[Dict[str, Any]] = None,
            strict: bool = False) -> CompileResult:
    """Capture ``model`` and rewrite it with a Sparse-IFT transform at equal FLOPs.

    >>> import sift_compiler as sift, torch, torchvision
    >>> x = torch.randn(1, 3, 224, 224)
    >>> result = sift.compile(torchvision.models.resnet18(), "parallel", 0.75, (x,))
    >>> print(result.report.table())            # per-layer FLOPs, iso-FLOP ratio
    >>> result.module(x).shape                  # torch.Size([1, 1000]); trainable, masks as buffers

    ``transform``: "none" (dense baseline), "parallel", "factorized", "doped" or "wide";
    ``sparsity``: s in [0, 1). ``seed`` fixes the masks and every new weight (the caller's torch
    RNG state is neither used nor advanced). The user's ``model`` is not modified. A transform that
    could not be applied as asked (layers kept at width, s' far from s: see `shortfall`) warns with
    a `SiftWarning`; ``strict=True`` makes it a `ShortfallError`.
    """
    config = CompileConfig(transform=transform, sparsity=sparsity, seed=seed, keep_dense=tuple(keep_dense),
                           activation=activation, linear_norm=linear_norm, round_to=round_to,
                           attention_width=attention_width, strict=strict)
    args, kwargs = _as_tuple(example_inputs), dict(example_kwargs or {})
    timing = TimingInstrument()
    captured = capture(model, args, kwargs, method=capture_method)
    unit = CompilationUnit(captured.module, args, kwargs, config)
    unit.baseline_layers = unit.analyses.get(LayerAnalysis)
    unit.baseline = unit.analyses.get(FlopAnalysis)
    unit.baseline_outputs = unit.analyses.get(ShapeAnalysis).outputs(unit.module)
    instruments = [timing] + ([ProgressInstrument(progress)] if progress is not None else [])
    pipeline = get_pipeline(TRANSFORM_PIPELINES[transform], config, instruments)
    # New parameters (dense factors, norms) come from the seed, not from the caller's RNG state,
    # which stays untouched; sparse weights and masks have per-layer streams of their own.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipeline.run(unit)
    check_as_asked(unit)  # warns, or raises with strict=True
    report = current_report(unit, model_name or type(model).__name__, captured.method)
    unit.module.sift_config = config  # lets flops()/export recognise a compiled module
    return CompileResult(unit.module, report, unit, config, captured.method, timing.timings, source)


def current_report(unit: CompilationUnit, model_name: str, capture_method: str) -> FlopReport:
    """The report of a unit as it is now (after passes, or after loading new masks)."""
    return build_report(unit, unit.baseline_layers, unit.analyses.get(FlopAnalysis), model=model_name,
                        capture=capture_method)


def flops(model: nn.Module, example_inputs: Any = (), example_kwargs: Optional[Dict[str, Any]] = None) -> FlopReport:
    """The FLOP report of any model, compiled or not, for these example inputs.

    A compiled module is measured as it is (its masks count); any other model is captured first.
    """
    args, kwargs = _as_tuple(example_inputs), dict(example_kwargs or {})
    if isinstance(model, fx.GraphModule) and hasattr(model, "sift_config"):
        gm, method, config = model, "compiled", model.sift_config
    else:
        captured = capture(model, args, kwargs)
        gm, method, config = captured.module, captured.method, CompileConfig()
    unit = CompilationUnit(gm, args, kwargs, CompileConfig())
    counts = unit.analyses.get(FlopAnalysis)
    unit.baseline = counts
    report = build_report(unit, unit.analyses.get(LayerAnalysis), counts, model=type(model).__name__, capture=method)
    report.transform = config.transform
    report.sparsity = config.sparsity
    return report
