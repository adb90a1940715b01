"""The Python API: `compile` and `flops` (re-exported by `sift_compiler`)."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, TextIO, Tuple, Union

import torch
import torch.fx as fx
import torch.nn as nn

from . import serialize
from .capture.experts import EXPERTS_KEPT_FUSED
from .capture.modules import is_transformers_model
from .capture.tracer import capture
from .exporters.checkpoints import save_pretrained
from .config import CompileConfig, CompileOptions, attach_config, config_of
from .errors import UserInputError
from .initialization import init_policy_for
from .latency import LatencyBudget, Probe, check_runtime, search
from .native import build_native, check_native
from .passes.base import ProgressInstrument, TimingInstrument
from .pipelines import pipeline_for
from .report import FlopReport, build_report, current_report
from .shortfall import check_as_asked
from .sparsity.counts import MaskFreeParameterCount
from .unit import CompilationUnit


@dataclass
class CompileResult:
    """What `compile` returns: the trainable module, its FLOP report and how it was made.

    ``module`` is the user's own model class with the rewrites in it (``output == "native"``), or
    the graph form, a `torch.fx.GraphModule` (``output == "graph"``; the report's notes say why).
    ``graph_module`` is always the graph form; both share their weights and masks.
    """

    module: nn.Module
    report: FlopReport
    unit: CompilationUnit
    config: CompileConfig
    capture_method: str
    timings: Dict[str, float]  # seconds: "capture", each pass by name, "native" (its build and check)
    source: Optional[Dict[str, Any]] = None  # how to rebuild the dense model (for save/load)
    output: str = "graph"
    latency: Optional[Any] = None            # budget="latency": the search behind it (latency.LatencySearch)

    @property
    def graph_module(self) -> fx.GraphModule:
        """The graph form the passes worked on (the same modules and tensors as a native ``module``)."""
        return self.unit.module

    def save(self, path: str) -> None:
        """Write the compiled model so that `sift_compiler.load` restores it (see serialize.py)."""
        serialize.save(self, path)

    def save_pretrained(self, directory: str, format: str = "auto", max_shard_size: str = "5GB") -> str:
        """Write a checkpoint folder: "standard" (a plain checkpoint of a wider model of the same
        class, loads with transformers alone), "compact" (values + bitmask), "sift" (the model's
        own save_pretrained) or "auto" (standard where it can be). Returns the format written;
        see `exporters.checkpoints`."""
        return save_pretrained(self, directory, format, max_shard_size)


def _as_tuple(example_inputs: Any) -> Tuple[Any, ...]:
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


_UNSET: Any = object()  # marks a sparsity not passed (compile(model, config, example_inputs))


_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(CompileConfig))
_OPTION_FIELDS = tuple(f.name for f in dataclasses.fields(CompileOptions))


def compile(model: nn.Module, transform: Union[str, CompileConfig] = "parallel", sparsity: Any = _UNSET,
            example_inputs: Any = (), example_kwargs: Optional[Dict[str, Any]] = None, *,
            config: Optional[CompileConfig] = None, options: Optional[CompileOptions] = None,
            **keywords: Any) -> CompileResult:
    """Capture ``model`` and rewrite it with a Sparse-IFT transform at equal FLOPs.

    >>> import sift_compiler as sift, torch, torchvision
    >>> x = torch.randn(1, 3, 224, 224)
    >>> result = sift.compile(torchvision.models.resnet18(), "parallel", 0.75, (x,))
    >>> print(result.report.table())            # per-layer FLOPs, iso-FLOP ratio
    >>> type(result.module)                     # torchvision.models.ResNet: your class, trainable
    >>> result.module(x).shape                  # torch.Size([1, 1000]); masks are buffers
    >>> config = sift.CompileConfig(transform="wide", sparsity=0.9, seed=1)
    >>> result = sift.compile(torchvision.models.resnet18(), config, (x,))   # the same, from a config

    What to make is a `CompileConfig`; how to run it, a `CompileOptions`. Either comes whole
    (``transform=config`` or ``config=``, ``options=``) or as keywords named after their fields
    (``seed=1``, ``keep_dense=[...]``, ``output="graph"``, ``progress=sys.stderr``...); a keyword
    that is no field of either is refused, and so is a config field given twice. ``transform``: a
    registered transform name ("none" for the dense baseline, "parallel", "factorized", "doped",
    "wide", or one added with `registry.register_transform`), or a whole `CompileConfig`; then the
    next positional arguments are ``example_inputs`` (and ``example_kwargs``). ``sparsity``: s in
    [0, 1) (default 0.75).

    ``seed`` fixes the masks and every new weight (the caller's torch RNG state is neither used
    nor advanced). The user's ``model`` is not modified. A transform that could not be applied as
    asked (layers kept at width, s' far from s: see `shortfall`) warns with a `SiftWarning`;
    ``strict=True`` makes it a `ShortfallError`. ``output``: "auto" returns a new object of the
    model's own class with the rewritten modules in it whenever that computes exactly what the
    graph computes (`native`), else the graph form with a note saying why; "native" raises
    `UserInputError` instead of falling back; "graph" always returns the `torch.fx.GraphModule`.

    ``capacity`` sets the transform's size instead of the iso-FLOP formula (`CompileConfig`);
    ``budget="latency"`` keeps the sparse layers at ``sparsity`` (not iso-FLOP) and, without a
    ``capacity``, searches the largest one whose latency on ``runtime`` ("deepsparse" or
    "onnxruntime") meets the dense model's (``latency``: a `latency.LatencyBudget`, e.g. the batch
    size and the ratio allowed); ``result.latency`` then holds the measurements.
    ``flop_tolerance``: None checks iso-FLOP up to what rounding explains (a `PostconditionError`
    beyond it); a number allows ``|sift/dense - 1|`` up to it instead.
    ``pattern="2:4"`` (any "N:M") draws transposable N:M masks at s = 1 - N/M, e.g.
    ``compile(model, "wide", 0.5, (x,), pattern="2:4")`` for GPU 2:4 kernels (`CompileConfig`).
    """
    unknown = sorted(set(keywords) - set(_CONFIG_FIELDS) - set(_OPTION_FIELDS))
    if unknown:
        raise UserInputError(f"compile() got unknown options {', '.join(unknown)}: the options are the fields of "
                             f"CompileConfig ({', '.join(_CONFIG_FIELDS[2:])}) and of CompileOptions "
                             f"({', '.join(_OPTION_FIELDS)})")
    config_keywords = {k: v for k, v in keywords.items() if k in _CONFIG_FIELDS}
    option_keywords = {k: v for k, v in keywords.items() if k in _OPTION_FIELDS}
    if isinstance(transform, CompileConfig):
        if config is not None:
            raise UserInputError("compile(model, config, ..., config=...): one CompileConfig, not two")
        config = transform
        example_inputs, example_kwargs = _inputs_after_config(sparsity, example_inputs, example_kwargs)
    if config is not None:
        twice = [k for k in _CONFIG_FIELDS if k in config_keywords]
        if twice:
            raise UserInputError(f"compile(model, config, ...): {', '.join(twice)} belong in the CompileConfig, "
                                 "not in keywords too")
    else:
        if "keep_dense" in config_keywords:
            config_keywords["keep_dense"] = tuple(config_keywords["keep_dense"])
        config = CompileConfig(transform=transform, sparsity=0.75 if sparsity is _UNSET else sparsity,
                               **config_keywords)
    options = dataclasses.replace(options or CompileOptions(), **option_keywords)
    return compile_config(model, config, example_inputs, example_kwargs, options)


def _inputs_after_config(sparsity: Any, example_inputs: Any, example_kwargs: Any) -> Tuple[Any, Any]:
    """compile(model, config, inputs[, kwargs]): the positional slots shift by one."""
    if sparsity is _UNSET:
        return example_inputs, example_kwargs
    if example_kwargs is not None:
        raise UserInputError("compile(model, config, example_inputs, example_kwargs): too many positional arguments")
    if isinstance(example_inputs, dict) or example_inputs is None:
        return sparsity, example_inputs
    if isinstance(example_inputs, tuple) and not example_inputs:
        return sparsity, None
    raise UserInputError("compile(model, config, example_inputs, example_kwargs): example_kwargs must be a dict")


def compile_config(model: nn.Module, config: CompileConfig, example_inputs: Any = (),
                   example_kwargs: Optional[Dict[str, Any]] = None,
                   options: Optional[CompileOptions] = None) -> CompileResult:
    """`compile` with what to make in a `CompileConfig` and how in a `CompileOptions` (what `compile` calls)."""
    options = options or CompileOptions()
    if config.budget == "latency" and config.capacity is None and config.transform != "none":
        return compile_for_latency(model, config, example_inputs, example_kwargs, options.runtime, options.latency,
                                   dataclasses.replace(options, progress=None), log=options.progress)
    capture_method, progress, output = options.capture_method, options.progress, options.output
    args, kwargs = _as_tuple(example_inputs), dict(example_kwargs or {})
    timing = TimingInstrument()
    start = time.perf_counter()
    captured = capture(model, args, kwargs, method=capture_method)
    timing.timings["capture"] = time.perf_counter() - start
    kwargs = captured.kwargs
    unit = CompilationUnit(captured.module, args, kwargs, config, record_baseline=True)
    unit.notes.extend(n for n in captured.notes if n.startswith(("meta device", EXPERTS_KEPT_FUSED)))
    unit.init_policy = init_policy_for(captured.model)
    instruments = [timing] + ([ProgressInstrument(progress)] if progress is not None else [])
    pipeline = pipeline_for(config, instruments)
    # New parameters (dense factors, norms) come from the seed, not from the caller's RNG state,
    # which stays untouched; sparse weights and masks have per-layer streams of their own.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        pipeline.run(unit)
    check_as_asked(unit)  # warns, or raises with strict=True
    name = options.model_name or type(model).__name__
    module, chosen = unit.module, "graph"
    if output != "graph":
        start = time.perf_counter()
        native, why = _native(unit, captured)
        timing.timings["native"] = time.perf_counter() - start
        if native is not None:
            module, chosen = native, "native"
        elif output == "native":
            raise UserInputError(f"output='native': {type(model).__name__} cannot be returned as its own class: "
                                 f"{why}. Use output='graph' (or 'auto') for the graph form")
        else:
            unit.notes.append(f"graph form returned (a torch.fx.GraphModule, not {type(model).__name__}): {why}")
    method = captured.method
    del captured  # the private model copy: it is the native module now, or no longer needed
    attach_config(unit.module, config)  # lets flops()/export recognise a compiled module
    attach_config(module, config)
    if chosen == "native" and is_transformers_model(module):
        module.num_parameters = MaskFreeParameterCount(module)  # masks are bool parameters, not weights
    report = current_report(unit, name, method)
    result = CompileResult(module, report, unit, config, method, timing.timings, options.source, chosen)
    if chosen == "native":
        serialize.attach_plan(result)
    return result


def _native(unit: CompilationUnit, captured) -> Tuple[Optional[nn.Module], str]:
    """(the native model, "") or (None, why the graph form is kept); see `native`."""
    build = build_native(unit, captured.model, captured.canonicalized)
    if build.module is None:
        return None, "; ".join(build.reasons[:3]) + (f" (and {len(build.reasons) - 3} more)"
                                                     if len(build.reasons) > 3 else "")
    if unit.on_meta:
        unit.notes.append("meta device: the native model was not run against the graph form (no values)")
        return build.module, ""
    # a second size only where sizes in the code were rewritten (see `native`)
    wrong, notes = check_native(build.module, unit.module, unit.args, unit.kwargs,
                                second_size=bool(unit.rewrites.literals))
    unit.notes.extend(notes)
    if wrong:
        return None, wrong
    unit.notes.extend(build.notes)
    return build.module, ""


def load(path: str, model: Optional[nn.Module] = None, trust_source: bool = False) -> CompileResult:
    """Load a compiled model written by `CompileResult.save` / ``sift-compile -o`` (a file) or by a
    Hugging Face model's ``save_pretrained`` (a directory): see `serialize.load`.

    >>> result = sift_compiler.load("model.sift.pt")        # or sift_compiler.load("checkpoint-500/")
    """
    return serialize.load(path, model, trust_source, compile_with=compile_config)


def flops(model: nn.Module, example_inputs: Any = (), example_kwargs: Optional[Dict[str, Any]] = None) -> FlopReport:
    """The FLOP report of any model, compiled or not, for these example inputs.

    A compiled module is measured as it is (its masks count); any other model is captured first.
    """
    args, kwargs = _as_tuple(example_inputs), dict(example_kwargs or {})
    config = config_of(model)
    if isinstance(model, fx.GraphModule) and config is not None:
        gm, method = model, "compiled"
    else:
        captured = capture(model, args, kwargs, copy_model=False)  # reads the model: no copy of its weights
        gm, method, config = captured.module, captured.method, config or CompileConfig()
    unit = CompilationUnit(gm, args, kwargs, CompileConfig(), record_baseline=True)  # measured as it is
    report = build_report(unit, unit.baseline_layers, unit.baseline, model=type(model).__name__, capture=method)
    report.transform = config.transform
    report.sparsity = config.sparsity
    return report


def compile_for_latency(model, config, example_inputs, example_kwargs,
                        runtime: Optional[str], latency: Optional[LatencyBudget],
                        options: Union[CompileOptions, Dict[str, Any], None] = None,
                        log: Optional[TextIO] = None, measured: Optional[Dict[float, Probe]] = None) -> CompileResult:
    """`sift_compiler.compile` with ``budget="latency"`` and no capacity: search it, return the chosen model.

    ``config``: the `CompileConfig` (its transform and sparsity; budget and capacity are set per
    candidate); ``options``: a `CompileOptions` (or a dict of its fields: model_name, output...).
    The result's ``latency`` holds the `LatencySearch`; its report notes the chosen capacity.
    """
    check_runtime(runtime)
    options = options if isinstance(options, CompileOptions) else CompileOptions(**(options or {}))
    budget = latency or LatencyBudget()
    transform, sparsity = config.transform, config.sparsity

    def compile_at(capacity: Optional[float], output: str = "graph"):  # candidates need no native model
        settings = dataclasses.replace(options, output=output)
        if capacity is None:
            dense = dataclasses.replace(config, transform="none", sparsity=0.0, budget="flops", capacity=None)
            return compile_config(model, dense, example_inputs, example_kwargs, settings)
        candidate = dataclasses.replace(config, budget="latency", capacity=capacity)
        return compile_config(model, candidate, example_inputs, example_kwargs, settings)
    if not isinstance(config, CompileConfig):
        raise TypeError(f"compile_for_latency takes a CompileConfig, not {type(config).__name__}")
    found = search(transform, sparsity, compile_at, example_inputs, example_kwargs, runtime, budget, log, measured)
    result = compile_at(found.capacity, options.output)
    result.latency = found
    result.report.notes.append(
        f"iso-latency: capacity {found.capacity:g} (iso-FLOP {found.iso_flop_capacity:.4g}) measured at "
        f"{found.latency_ratio:.3f}x the dense latency on {runtime} (batch {budget.batch_size}, budget "
        f"{budget.ratio:g}x), FLOPs {found.flop_ratio:.3f}x dense" + (f"; {found.note}" if found.note else ""))
    return result
