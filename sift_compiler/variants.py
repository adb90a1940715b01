"""Compile and export a model's dense baseline and its Sparse-IFT variants, ready to benchmark.

``export_variants("torchvision:resnet18", ["parallel"], [0.5, 0.9], out_dir)`` builds the dense
model once (weights drawn after ``torch.manual_seed(seed)``, so the same command gives the same
files), compiles it with each transform at each sparsity, and exports every result with
`export_onnx` (verified, in the chosen export form). File names say what they are:
``resnet18-dense.onnx``, ``resnet18-parallel-0.90.onnx``.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, TextIO, Tuple

import torch

from .api import compile as sift_compile
from .capture.sources import load_model
from .config import CompileConfig
from .exporters.bench import BenchModel
from .exporters.forms import DEFAULT_FORM, has_export_forms
from .exporters.onnx import ExportInfo, export_onnx


@dataclass
class Variant:
    """One exported model: its benchmark entry and what the exporter found."""

    model: BenchModel
    info: ExportInfo
    compile_s: float
    export_s: float


def family_name(spec: str) -> str:
    """'torchvision:resnet18,num_classes=10' -> 'resnet18' (for labels and file names)."""
    head = spec.split(",", 1)[0]
    name = head.rsplit(":", 1)[-1].rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.splitext(name)[0]) or "model"


def export_variants(spec: str, transforms: Sequence[str], sparsities: Sequence[float], out_dir: str, *,
                    input_shape: Optional[Tuple[int, ...]] = None, input_dtype=None, weights: Optional[str] = None,
                    form: str = DEFAULT_FORM, seed: int = 0, opset: int = 17, deepsparse: str = "auto",
                    log: Optional[TextIO] = None, include_dense: bool = True,
                    save_compiled: bool = False) -> List[Variant]:
    """The dense model (``include_dense``) and every transform x sparsity, exported into ``out_dir``.

    ``save_compiled`` also writes each compiled model beside its file (``LABEL.sift.pt``, for the
    torch engines of `bench`).

    ``log``: where to say what is being compiled (e.g. ``sys.stderr``); silent by default.
    """
    family = family_name(spec)
    torch.manual_seed(seed)
    source = load_model(spec, input_shape, input_dtype, weights=weights)
    jobs = [("none", 0.0)] if include_dense else []
    jobs += [(t, s) for t in transforms if t != "none" for s in sparsities]
    variants = []
    for transform, sparsity in jobs:
        label = f"{family}-dense" if transform == "none" else f"{family}-{transform}-{sparsity:.2f}"
        if log:
            print(f"sift: compiling and exporting {label} (input {source.describe_input()})", file=log, flush=True)
        start = time.perf_counter()
        config = CompileConfig(transform=transform, sparsity=sparsity, seed=seed)
        result = sift_compile(source.module, config, source.args, source.kwargs, model_name=spec,
                              source={"spec": spec, "family": source.family, "weights": weights})
        compiled = time.perf_counter() - start
        path = os.path.join(out_dir, f"{label}.onnx")
        start = time.perf_counter()
        info = export_onnx(result.module, source.args, path, source.kwargs, opset=opset, form=form,
                           deepsparse=deepsparse)
        exported = time.perf_counter() - start
        effective = result.report.effective_sparsity
        torch_path = ""
        if save_compiled:
            torch_path = os.path.join(out_dir, f"{label}.sift.pt")
            result.save(torch_path)
        entry = BenchModel(label, path, transform, sparsity if transform != "none" else 0.0, family,
                           form if has_export_forms(transform) else "", info.deepsparse_reason, torch_path)
        if log and effective is not None and transform != "none":
            print(f"sift: {label}: sparse layers at s' = {effective:.4f} (iso-FLOP compensation)", file=log)
        variants.append(Variant(entry, info, compiled, exported))
        del result
    return variants
