"""Verification of an ONNX file: the checks the exporter runs after writing, and `sift-check` runs in CI.

=============================  ==================================================================
``onnx-checker``               ``onnx.checker.check_model(full_check=True)`` (types and shapes)
``sparsity``                   every sift sparse layer is in the file with its zeros: at most the
                               non-zeros of its mask, and at least its target sparsity (rounded)
``min-sparsity``               (when asked) every sparse layer is at least that sparse
``onnxruntime-vs-torch``       (when torch outputs are given) onnxruntime agrees with torch
``onnxruntime-other-shape``    (when the file declares dynamic axes and torch outputs are given)
                               onnxruntime agrees with torch at one more sample in the batch (and
                               one token less, for token ids): no size was fixed at export
``deepsparse-allowed``         (files the exporter marked) fails: the exporter found that DeepSparse
                               must not run the file, and says why (exporters/outcome.py)
``deepsparse-compiles``        DeepSparse compiles the file (in a child process: an abort or a hang is
                               a failed check with one line of reason); its fraction of supported ops
``deepsparse-supported-ops``   (when asked) that fraction is at least the minimum
``deepsparse-vs-onnxruntime``  DeepSparse's outputs agree with onnxruntime's. Runtimes have bugs:
                               DeepSparse 1.8 sums >= 9 convs of one input wrongly, so this runs
                               on every export (docs/deployment.md)
``openvino-vs-onnxruntime``    (where DeepSparse cannot run: Python >= 3.12 or not installed, and
                               OpenVINO is installed) OpenVINO's outputs agree with onnxruntime's,
                               so a second runtime still checks the first; a file OpenVINO cannot
                               load is skipped with the reason (its op coverage, not the file)
=============================  ==================================================================

Output agreement is ``max|a - b| / max|b| <= rtol``: the largest error relative to the output's
scale (at least 1e-6: smaller outputs, e.g. of random-weight models whose activations vanish, are
compared at that floor), so one tolerance serves logits and features alike. Errors of runtime bugs are of the order
of the outputs; FP32 reordering gives about 1e-6.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import math

import numpy as np

from ..compare import compare_to_reference
from ..errors import ExportError, SiftError, first_line
from .runtimes import deepsparse_status, engine_status, open_engine
from .weights import LayerSparsity, load_onnx, layers_from_metadata, not_for_deepsparse, weight_arrays

DEFAULT_RTOL = 1e-3
SCALE_FLOOR = 1e-6
OTHER_SHAPE_CHECK = "onnxruntime-other-shape"
MARK_CHECK = "deepsparse-allowed"


@dataclass
class Check:
    """One check: its name, whether it held, and what was measured (or why it was skipped)."""

    name: str
    ok: bool
    detail: str
    skipped: bool = False

    @property
    def status(self) -> str:
        return "skipped" if self.skipped else ("ok" if self.ok else "FAILED")


@dataclass
class OutputError:
    """How far one runtime's outputs are from another's, over all outputs."""

    max_abs: float
    scale: float

    @property
    def rel(self) -> float:
        # outputs below SCALE_FLOOR (random-weight models whose activations vanish) are float32 noise of
        # O(1) intermediates: measured against the floor, not against themselves
        scale = max(self.scale, SCALE_FLOOR)
        return self.max_abs / scale if math.isfinite(self.max_abs) else float("inf")

    def describe(self) -> str:
        return f"max abs error {self.max_abs:.3g}, relative {self.rel:.3g} (output scale {self.scale:.3g})"


@dataclass
class Verification:
    """All checks of one file; ``ok`` when none failed (skipped checks do not fail)."""

    path: str
    checks: List[Check] = field(default_factory=list)
    layers: List[LayerSparsity] = field(default_factory=list)
    errors: Dict[str, OutputError] = field(default_factory=dict)
    fraction_of_supported_ops: Optional[float] = None
    weight_sparsity: Optional[float] = None

    @property
    def ok(self) -> bool:
        return all(c.ok or c.skipped for c in self.checks)

    def failures(self) -> List[str]:
        return [f"{c.name}: {c.detail}" for c in self.checks if not (c.ok or c.skipped)]

    def table(self) -> str:
        width = max([len(c.name) for c in self.checks] + [5])
        lines = [f"{self.path}"]
        lines += [f"  {c.name:<{width}}  {c.status:<7}  {c.detail}" for c in self.checks]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"path": self.path, "ok": self.ok, "failures": self.failures(),
                "checks": [asdict(c) | {"status": c.status} for c in self.checks],
                "output_errors": {k: {"max_abs": v.max_abs, "rel": v.rel, "scale": v.scale}
                                  for k, v in self.errors.items()},
                "fraction_of_supported_ops": self.fraction_of_supported_ops,
                "weight_sparsity": self.weight_sparsity,
                "layers": [asdict(layer) | {"sparsity": layer.sparsity, "target_sparsity": layer.target_sparsity}
                           for layer in self.layers]}


def compare_outputs(actual: Sequence[np.ndarray], expected: Sequence[np.ndarray]) -> OutputError:
    """The error of ``actual`` against ``expected`` (`compare.compare_to_reference`); the outputs must
    agree in count and shapes (else `ExportError`)."""
    comparison = compare_to_reference(list(actual), list(expected))
    if comparison.structural:
        raise ExportError(comparison.mismatch)
    return OutputError(comparison.max_abs, comparison.scale)


def _checker(path: str) -> Check:
    import onnx  # lazy: onnx takes 0.2 s to import, and `import sift_compiler` does not need it
    try:
        onnx.checker.check_model(path, full_check=True)
    except Exception as e:  # the checker raises ValidationError, InferenceError and others
        return Check("onnx-checker", False, f"{type(e).__name__}: {first_line(e)}")
    return Check("onnx-checker", True, "valid")


def sparsity_checks(layers: Optional[List[LayerSparsity]], missing: Sequence[str], model,
                    min_sparsity: Optional[float]) -> List[Check]:
    """The ``sparsity`` check (recorded layers) and the optional ``min-sparsity`` check."""
    checks = []
    if layers is None:
        checks.append(Check("sparsity", True, "no sift layer records in the file (not exported by sift, or "
                                              "metadata stripped): pass --against or --min-sparsity", skipped=True))
    else:
        problems = [f"{name}: no initializer carries its zero pattern (zeros lost in export?)" for name in missing]
        for layer in layers:
            where = f"{layer.layer} ({layer.initializer})"
            if layer.nnz < 0:
                problems.append(f"{where}: initializer not found in the file")
            elif layer.nnz > layer.mask_nnz:
                problems.append(f"{where}: {layer.nnz} non-zeros where its mask keeps {layer.mask_nnz} "
                                "(zeros destroyed)")
            elif layer.nnz > layer.max_nnz:
                problems.append(f"{where}: sparsity {layer.sparsity:.4f} below its target {layer.target_sparsity:.4f}")
        if problems:
            checks.append(Check("sparsity", False, f"{len(problems)} of {len(layers) + len(missing)} sparse layers: "
                                + "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else "")))
        elif not layers:
            checks.append(Check("sparsity", True, "no sparse layers recorded (a dense model)"))
        else:
            low = min(layers, key=lambda la: la.sparsity)
            checks.append(Check("sparsity", True, f"{len(layers)} sparse layers keep their zeros; least sparse "
                                                  f"{low.layer} at {low.sparsity:.4f} (target {low.target_sparsity:.4f})"))
    if min_sparsity is not None:
        checks.append(_min_sparsity_check(layers, model, min_sparsity))
    return checks


def _min_sparsity_check(layers: Optional[List[LayerSparsity]], model, minimum: float) -> Check:
    """With layer records: every sparse layer. Without: every weight but the first and the last."""
    if layers:
        rows = [(la.layer, la.sparsity, la.numel) for la in layers]
        scope = "sparse layers"
    else:
        tensors = [t for t, _ in weight_arrays(model)]
        rows = [(t.initializer, t.sparsity, t.numel) for t in tensors[1:-1]]
        scope = "weights (all but the first and last)"
    if not rows:
        return Check("min-sparsity", False, f"no {scope} to check")
    low = [(name, s) for name, s, numel in rows if s < minimum - 0.5 / numel]
    if low:
        listed = ", ".join(f"{name} {s:.4f}" for name, s in low[:5]) + (" ..." if len(low) > 5 else "")
        return Check("min-sparsity", False, f"{len(low)} of {len(rows)} {scope} below {minimum}: {listed}")
    return Check("min-sparsity", True, f"all {len(rows)} {scope} >= {minimum} (least {min(s for _, s, _ in rows):.4f})")


def overall_weight_sparsity(model) -> Optional[float]:
    """Zeros over all Conv/Gemm/MatMul weights of the file."""
    tensors = [t for t, _ in weight_arrays(model)]
    total = sum(t.numel for t in tensors)
    return 1.0 - sum(t.nnz for t in tensors) / total if total else None


def _output_check(name: str, actual, expected, rtol: float, report: Verification) -> Check:
    try:
        error = compare_outputs(actual, expected)
    except ExportError as e:
        return Check(name, False, str(e))
    report.errors[name] = error
    return Check(name, error.rel <= rtol, f"{error.describe()}; tolerance {rtol:g}")


def _deepsparse_checks(path: str, feeds, ort_outputs, rtol: float, min_supported_ops: Optional[float],
                       mode: str, num_cores: Optional[int], report: Verification) -> List[Check]:
    usable, reason = deepsparse_status()
    if not usable:
        if mode == "require":
            return [Check("deepsparse-compiles", False, reason)]
        return [Check("deepsparse-compiles", True, reason, skipped=True)] + \
            _openvino_checks(path, feeds, ort_outputs, rtol, num_cores, report)
    batch = next(iter(feeds.values())).shape[0] if feeds else 1
    try:
        engine = open_engine("deepsparse", path, batch, num_cores, [list(v.shape) for v in feeds.values()])
    except SiftError as e:  # a refusal, or a native abort/hang in the worker (one line: exporters.runtimes)
        return [Check("deepsparse-compiles", False, str(e))]
    with engine:
        fraction = engine.fraction_of_supported_ops
        report.fraction_of_supported_ops = fraction
        checks = [Check("deepsparse-compiles", True, f"fraction of supported ops {fraction:.4f} "
                                                     f"({engine.description})")]
        if min_supported_ops is not None:
            checks.append(Check("deepsparse-supported-ops", fraction >= min_supported_ops - 1e-9,
                                f"{fraction:.4f}, minimum {min_supported_ops:g}"))
        if ort_outputs is None:
            checks.append(Check("deepsparse-vs-onnxruntime", True, "onnxruntime did not run", skipped=True))
            return checks
        try:
            outputs = engine.run(feeds)
        except SiftError as e:
            return checks + [Check("deepsparse-vs-onnxruntime", False, f"DeepSparse failed to run: {e}")]
    checks.append(_output_check("deepsparse-vs-onnxruntime", outputs, ort_outputs, rtol, report))
    return checks


def _openvino_checks(path: str, feeds, ort_outputs, rtol: float, num_cores: Optional[int],
                     report: Verification) -> List[Check]:
    """OpenVINO against onnxruntime, in DeepSparse's place (nothing when OpenVINO is not installed)."""
    if ort_outputs is None or not engine_status("openvino")[0]:
        return []
    try:
        with open_engine("openvino", path, 1, num_cores, [list(v.shape) for v in feeds.values()]) as engine:
            outputs = engine.run(feeds)
    except SiftError as e:
        return [Check("openvino-vs-onnxruntime", True, str(e), skipped=True)]
    return [_output_check("openvino-vs-onnxruntime", outputs, ort_outputs, rtol, report)]


def deepsparse_absence(report: Verification) -> str:
    """Why DeepSparse did not check ``report``'s file because it cannot run here ("" when it ran or was skipped)."""
    return next((c.detail for c in report.checks if c.name == "deepsparse-compiles" and c.skipped), "")


def runtimes_that_checked(report: Verification) -> List[str]:
    """The runtimes whose outputs were compared in ``report`` (onnxruntime, openvino, deepsparse)."""
    names = {"onnxruntime-vs-torch": "onnxruntime", "onnxruntime-runs": "onnxruntime",
             "openvino-vs-onnxruntime": "openvino", "deepsparse-vs-onnxruntime": "deepsparse"}
    return list(dict.fromkeys(names[c.name] for c in report.checks if c.name in names and not c.skipped))


def verify_onnx(path: str, feeds: Dict[str, np.ndarray], *, reference: Optional[Sequence[np.ndarray]] = None,
                layers: Optional[List[LayerSparsity]] = None, missing: Sequence[str] = (),
                min_sparsity: Optional[float] = None, rtol: float = DEFAULT_RTOL, deepsparse: str = "auto",
                min_supported_ops: Optional[float] = None, num_cores: Optional[int] = None,
                other_shape: Optional[Tuple[Dict[str, np.ndarray], Sequence[np.ndarray]]] = None) -> Verification:
    """Run every check on ``path`` (see the module docstring) and return them all; never raises on a failed check.

    ``feeds``: inputs by name; ``reference``: torch's outputs on them (enables onnxruntime-vs-torch);
    ``layers``/``missing``: the exporter's layer matching (default: the file's ``sift.layers``
    metadata); ``deepsparse``: "auto" (skip when not installed), "require" or "skip" (which also
    skips ``deepsparse-allowed``);
    ``other_shape``: (feeds, torch outputs) at another size of the file's dynamic axes.

    >>> report = verify_onnx("model.onnx", {"input": x})
    >>> report.ok, report.failures()
    """
    report = Verification(path)
    report.checks.append(_checker(path))
    model = load_onnx(path)
    if layers is None:
        layers = layers_from_metadata(model)
    report.layers = list(layers or [])
    report.weight_sparsity = overall_weight_sparsity(model)
    report.checks += sparsity_checks(layers, missing, model, min_sparsity)
    marked = not_for_deepsparse(model)
    del model
    ort_outputs, session = None, None
    try:
        session = open_engine("onnxruntime", path, 1, num_cores)
        ort_outputs = session.run(feeds)
        if reference is not None:
            report.checks.append(_output_check("onnxruntime-vs-torch", ort_outputs, reference, rtol, report))
        else:
            report.checks.append(Check("onnxruntime-runs", True, f"{len(ort_outputs)} outputs"))
    except Exception as e:  # onnxruntime refusing the file is a failed check, not a crash
        report.checks.append(Check("onnxruntime-runs", False, f"{type(e).__name__}: {first_line(e)}"))
    if other_shape is not None and ort_outputs is not None and session is not None:
        other_feeds, other_reference = other_shape
        shapes = ", ".join(f"{n} {tuple(v.shape)}" for n, v in other_feeds.items())
        try:
            outputs = session.run(other_feeds)
        except Exception as e:
            report.checks.append(Check(OTHER_SHAPE_CHECK, False, f"at {shapes}: {type(e).__name__}: {first_line(e)}"))
        else:
            check = _output_check(OTHER_SHAPE_CHECK, outputs, other_reference, rtol, report)
            report.checks.append(Check(check.name, check.ok, f"at {shapes}: {check.detail}"))
    del session
    if marked is not None and deepsparse != "skip":
        report.checks.append(Check(MARK_CHECK, False, f"the exporter found that DeepSparse must not run this file "
                                                      f"(written for onnxruntime): {marked}"))
    if deepsparse != "skip":
        report.checks += _deepsparse_checks(path, feeds, ort_outputs, rtol, min_supported_ops, deepsparse, num_cores,
                                            report)
    return report
