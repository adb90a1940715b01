"""Export, then the remedies that recompile the model when DeepSparse still cannot run the file.

`outcome` lists the remedies (`compile_remedies`) and `onnx` tries the ones that need only the
finished module; this module, above both, drives the ones that need the model compiled again.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from typing import Any, Callable, Optional

from ..errors import VerificationFailed
from .onnx import export_onnx
from .outcome import compile_remedies, deepsparse_failure
from .settings import ExportSettings


def export_with_compile_remedies(result, compile_with: Callable[..., Any], example_inputs, path: str,
                                 example_kwargs=None, *, settings: Optional[ExportSettings] = None,
                                 **export_options: Any):
    """`export_onnx`, then the remedies that recompile the model when DeepSparse still cannot run the file.

    ``compile_with(**changes)`` recompiles the model with changed compile options (e.g.
    ``round_to=8``). Returns (the compile result written, its `ExportInfo`, a note saying which
    recompilation was kept, or ""). A recompiled model is written only if DeepSparse verifies it.
    The export options: an `ExportSettings` and/or its fields as keywords, as `export_onnx` takes them.
    """
    settings = ExportSettings.of(settings, **export_options)
    mode = settings.deepsparse
    try:
        info = export_onnx(result.module, example_inputs, path, example_kwargs, settings=settings)
    except VerificationFailed as e:
        if mode != "require" or deepsparse_failure(getattr(e, "verification", None)) is None:
            raise
        info, failure = None, e
    if info is not None and info.outcome != "not-for-deepsparse":
        return result, info, ""
    config = result.config
    for remedy in compile_remedies(config.transform, config.channel_multiple):
        candidate = compile_with(**remedy.changes)
        stage = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(os.path.abspath(path)))
        try:
            staged = os.path.join(stage, os.path.basename(path))
            try:
                trial = export_onnx(candidate.module, example_inputs, staged, example_kwargs,
                                    settings=dataclasses.replace(settings, deepsparse="require"))
            except VerificationFailed:
                continue
            for name in sorted(os.listdir(stage), key=lambda n: n == os.path.basename(path)):  # model file last
                os.replace(os.path.join(stage, name), os.path.join(os.path.dirname(os.path.abspath(path)), name))
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        trial.path = path
        if trial.data_path:
            trial.data_path = os.path.join(os.path.dirname(os.path.abspath(path)), os.path.basename(trial.data_path))
        trial.outcome = "remedied"
        trial.notes.insert(0, f"{remedy.note}: DeepSparse failed on the model as compiled "
                              f"({info.deepsparse_reason if info is not None else failure})")
        return candidate, trial, remedy.note
    if info is None:
        raise failure
    return result, info, ""

