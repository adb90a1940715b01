"""Exporters: masked ONNX (exact zeros), its verification, and the runtimes that check and time it.

>>> info = export_onnx(result.module, (x,), "model.onnx")     # written, verified (exporters.checks)
>>> verify_onnx("model.onnx", {"input": x.numpy()}).ok        # the same checks on any file
"""
from .checks import Check, Verification, verify_onnx
from .forms import DEFAULT_FORM, FORMS, apply_form
from .onnx import ExportInfo, bake_masks, export_onnx
from .outcome import OUTCOMES
from .settings import ExportSettings
from .runtimes import ENGINES, EngineCrash, deepsparse_status, open_engine

__all__ = ["ExportInfo", "bake_masks", "export_onnx", "verify_onnx", "Verification", "Check", "apply_form",
           "FORMS", "DEFAULT_FORM", "ENGINES", "EngineCrash", "OUTCOMES", "ExportSettings", "deepsparse_status", "open_engine"]
