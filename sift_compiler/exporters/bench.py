"""Timing models on DeepSparse, onnxruntime, OpenVINO and torch, side by side, with one protocol for all.

For each model and engine: compile the file for the batch size, run ``warmup`` untimed batches,
then ``iterations`` timed ones (wall clock around one ``run`` call each; the same random inputs
every time). Latency is per batch (median and 90th percentile); throughput is items per second
over the timed runs. Engines run one after the other, never at the same time, so they do not
compete for cores. The torch engines run the compiled model of the file (``BenchModel.torch_path``,
loaded by ``load_torch``); a model without one gets a skipped row, not a failed one.

>>> results = run_benchmarks([BenchModel("dense", "r18.onnx")], ["deepsparse", "onnxruntime"], batch_size=16)
>>> print(results_table(results))
"""
from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..errors import ExportError, SiftError
from .checks import overall_weight_sparsity
from .forms import has_export_forms
from .inputs import batch_of, input_specs, random_feeds
from .runtimes import TORCH_ENGINES, deepsparse_version, open_engine
from .weights import META_EXPORT, get_metadata, load_onnx, not_for_deepsparse


@dataclass
class BenchModel:
    """A file to time, with what the table and plot say about it."""

    label: str
    path: str
    transform: str = "?"            # "none" for the dense baseline; "?" when the file does not say
    sparsity: Optional[float] = None
    family: str = ""                # models of one family share a dense baseline ("resnet18")
    form: str = ""                  # the export form of Sparse Parallel layers, when it matters
    not_for_deepsparse: str = ""    # why the exporter marked the file as not for DeepSparse (exporters/outcome.py)
    torch_path: str = ""            # the compiled torch model of the file (.sift.pt), for the torch engines
    compiled_here: bool = False     # compiled by this run from a spec (its torch model may be rebuilt from code)


@dataclass
class BenchResult:
    """The timings of one model on one engine."""

    label: str
    path: str
    engine: str
    batch_size: int
    num_cores: Optional[int]
    latencies_ms: List[float]
    transform: str = "?"
    sparsity: Optional[float] = None
    family: str = ""
    form: str = ""
    fraction_of_supported_ops: Optional[float] = None
    engine_description: str = ""
    compile_s: float = 0.0
    error: str = ""                 # why this engine could not time the model (the row is marked failed)
    skipped: bool = False           # the engine does not take this kind of model (``error`` says why): not a failure

    @property
    def failed(self) -> bool:
        return bool(self.error) and not self.skipped

    @property
    def median_ms(self) -> float:
        return float(np.median(self.latencies_ms)) if self.latencies_ms else float("nan")

    @property
    def p90_ms(self) -> float:
        return float(np.percentile(self.latencies_ms, 90)) if self.latencies_ms else float("nan")

    @property
    def items_per_s(self) -> float:
        total = sum(self.latencies_ms) / 1000.0
        return self.batch_size * len(self.latencies_ms) / total if total > 0 else float("nan")

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(median_ms=self.median_ms, p90_ms=self.p90_ms, items_per_s=self.items_per_s)
        return data


def describe_file(path: str, label: Optional[str] = None, family: str = "") -> BenchModel:
    """A `BenchModel` for any ONNX file: transform and sparsity from sift's metadata, else measured."""
    model = load_onnx(path)
    meta = get_metadata(model, META_EXPORT) or {}
    transform = str(meta.get("transform", "?"))
    sparsity = meta.get("sparsity")
    if sparsity is None:
        sparsity = overall_weight_sparsity(model)
        sparsity = round(sparsity, 4) if sparsity is not None else None
        if sparsity is not None and sparsity < 0.01:
            transform = "none"  # no zeros to speak of: treat it as a dense model
    name = label or os.path.splitext(os.path.basename(path))[0]
    form = str(meta.get("form", "")) if has_export_forms(transform) else ""
    torch_path = path[:-len(".onnx")] + ".sift.pt" if path.lower().endswith(".onnx") else ""
    return BenchModel(name, path, transform, sparsity, family, form, not_for_deepsparse(model) or "",
                      torch_path if torch_path and os.path.isfile(torch_path) else "")


def machine_description() -> Dict[str, object]:
    """CPU model, core count, Python and engine versions: what a timing table must state."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: Dict[str, object] = {"cpu": cpu, "logical_cores": os.cpu_count(), "machine": platform.machine(),
                               "python": platform.python_version()}
    try:
        import onnxruntime  # lazy: slow to import, and only its version is wanted here
        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    try:
        import openvino  # optional (the [openvino] extra)
        info["openvino"] = openvino.get_version().split("-")[0]
    except ImportError:
        pass
    info["torch"] = torch.__version__
    version = deepsparse_version()
    if version:
        info["deepsparse"] = version
    return info


def run_benchmarks(models: Sequence[BenchModel], engines: Sequence[str], batch_size: int, iterations: int = 10,
                   warmup: int = 2, num_cores: Optional[int] = None, progress: bool = True,
                   input_shapes: Optional[Dict[str, tuple]] = None, seed: int = 0, rounds: int = 1,
                   load_torch: Optional[Callable[[str], object]] = None) -> List[BenchResult]:
    """Time every model on every engine (see the module docstring); a progress bar on stderr.

    ``rounds`` > 1 repeats the whole sweep (models in turn, each engine compiled afresh) and pools
    each model's timings: on a shared machine, load that comes and goes then lands on every model
    alike instead of on whichever model ran at the wrong minute. A model an engine cannot compile or
    run (a DeepSparse abort, say) gets a failed result with the reason and is not retried; the
    others go on. ``load_torch(torch_path)`` gives the torch engines their module (loaded once).
    """
    pooled: Dict[tuple, BenchResult] = {}
    modules: Dict[str, object] = {}

    def module_of(model: BenchModel):
        if not model.torch_path or load_torch is None:
            return None
        if model.torch_path not in modules:
            try:
                modules[model.torch_path] = load_torch(model.torch_path)
            except SiftError as e:   # e.g. user code it may not import: the torch rows say why
                modules[model.torch_path] = e
        return modules[model.torch_path]
    total = rounds * len(models) * len(engines) * (warmup + iterations)
    with tqdm(total=total, desc="sift-bench", unit="batch", disable=not progress, leave=False) as bar:
        for _ in range(rounds):
            for model in models:
                specs = input_specs(load_onnx(model.path))
                feeds = random_feeds(specs, batch_size, input_shapes, seed)
                batch = batch_of(feeds)
                if batch != batch_size and not any(k[0] == model.label for k in pooled):
                    bar.write(f"note: {model.label} has a fixed batch of {batch} (exported with static shapes); "
                              f"timed at batch {batch}", file=sys.stderr)
                for name in engines:
                    key = (model.label, model.path, name)
                    if key in pooled and (pooled[key].failed or pooled[key].skipped):
                        bar.update(warmup + iterations)
                        continue
                    bar.set_postfix_str(f"{model.label} on {name}")
                    module = module_of(model) if name in TORCH_ENGINES else None
                    result = _time_one(model, name, feeds, batch, num_cores, warmup, iterations,
                                       lambda: bar.update(1), module)
                    if result.skipped:
                        bar.update(warmup + iterations)
                    if result.failed:
                        bar.write(f"sift-bench: {model.label} on {name}: FAILED: {result.error}", file=sys.stderr)
                    if key in pooled:
                        pooled[key].latencies_ms += result.latencies_ms
                        pooled[key].error = result.error
                    else:
                        pooled[key] = result
    return list(pooled.values())


def _time_one(model: BenchModel, name: str, feeds, batch_size: int, num_cores: Optional[int], warmup: int,
              iterations: int, tick, module=None) -> BenchResult:
    result = BenchResult(model.label, model.path, name, batch_size, num_cores, [], model.transform,
                         model.sparsity, model.family, model.form)
    if name == "deepsparse" and model.not_for_deepsparse:
        result.error = f"the exporter marked the file not for DeepSparse: {model.not_for_deepsparse}"
        return result
    if name in TORCH_ENGINES and (module is None or isinstance(module, Exception)):
        result.error = (f"{name} runs the compiled torch model; {model.path} has no "
                        f"{os.path.basename(model.path)[:-5]}.sift.pt beside it (sift-compile -o)") if module is None \
            else f"{name} cannot load {model.torch_path}: {module}"
        result.skipped = True
        return result
    start = time.perf_counter()
    try:
        with open_engine(name, model.path, batch_size, num_cores, [list(v.shape) for v in feeds.values()],
                         module=module) as engine:
            result.compile_s = time.perf_counter() - start
            result.fraction_of_supported_ops = engine.fraction_of_supported_ops
            result.engine_description = engine.description
            result.latencies_ms = engine.time(feeds, warmup, iterations, tick)
    except ExportError as e:  # the engine refused or died (EngineCrash): a failed row, not a failed run
        result.error = str(e)
        result.latencies_ms = []
    return result


# ---------------------------------------------------------------------------------------------
# Reporting


def dense_latency(results: Sequence[BenchResult], family: str, engine: str) -> Optional[float]:
    """Median latency of the family's dense model on ``engine`` (None if there is none)."""
    for r in results:
        if r.engine == engine and r.transform == "none" and r.family == family and r.latencies_ms:
            return r.median_ms
    return None


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None or value != value else format(value, spec)


def results_table(results: Sequence[BenchResult]) -> str:
    """One row per model, engines side by side, then the ratios the paper reports.

    ``DS/ORT``: onnxruntime latency over DeepSparse latency (DeepSparse's speedup on the same
    model); ``vs dense``: latency over the dense model's on the same engine (ideal: 1.00).
    """
    engines = list(dict.fromkeys(r.engine for r in results))
    short = {"deepsparse": "DS", "onnxruntime": "ORT", "openvino": "OV", "openvino-sparse": "OV-sparse"}
    rows = []
    header = ["model", "transform", "sparsity"]
    for e in engines:
        s = short.get(e, e)
        header += [f"{s} median ms", f"{s} p90 ms", f"{s} items/s", f"{s} vs dense"]
    if {"deepsparse", "onnxruntime"} <= set(engines):
        header.append("DS speedup over ORT")
    by_model: Dict[str, Dict[str, BenchResult]] = {}
    for r in results:
        by_model.setdefault(r.label, {})[r.engine] = r
    for label, per_engine in by_model.items():
        first = next(iter(per_engine.values()))
        row = [label, first.transform, _fmt(first.sparsity, ".2f")]
        for e in engines:
            r = per_engine.get(e)
            if r is None or r.failed or r.skipped:
                row += ["FAILED" if r is not None and r.failed else "-"] + ["-"] * 3
                continue
            dense = dense_latency(results, r.family, e)
            row += [_fmt(r.median_ms, ".1f"), _fmt(r.p90_ms, ".1f"), _fmt(r.items_per_s, ".1f"),
                    _fmt(r.median_ms / dense if dense else None, ".2f")]
        if {"deepsparse", "onnxruntime"} <= set(engines):
            ds, ort = per_engine.get("deepsparse"), per_engine.get("onnxruntime")
            ds, ort = (None if ds is None or ds.failed else ds), (None if ort is None or ort.failed else ort)
            row.append(_fmt(ort.median_ms / ds.median_ms if ds and ort else None, ".2f") + ("x" if ds and ort else ""))
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in rows]
    lines += [f"FAILED: {r.label} on {r.engine}: {r.error}" for r in results if r.failed]
    lines += [f"skipped: {r.label} on {r.engine}: {r.error}" for r in results if r.skipped]
    return "\n".join(lines)


def results_json(results: Sequence[BenchResult], settings: Dict[str, object]) -> Dict[str, object]:
    """Everything measured, with the machine and the settings, as one JSON-ready dict."""
    return {"machine": machine_description(), "settings": settings,
            "results": [r.to_dict() for r in results]}
