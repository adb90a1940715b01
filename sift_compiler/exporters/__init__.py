"""Exporters: masked ONNX (exact zeros) and the runtimes that check and time it."""
from .onnx import ExportInfo, bake_masks, export_onnx

__all__ = ["ExportInfo", "bake_masks", "export_onnx"]
