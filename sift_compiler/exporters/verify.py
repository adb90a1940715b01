"""Checks on an exported ONNX file: it loads, and runtimes agree with torch."""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import numpy as np
import torch

from ..errors import ExportError, first_line


def onnx_feed(info, args: Sequence[Any], kwargs: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """The example inputs as an onnxruntime feed, by the exported input names."""
    tensors = [t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)]
    if len(tensors) != len(info.input_names):
        raise ExportError(f"{len(tensors)} example inputs for {len(info.input_names)} ONNX inputs")
    return {name: t.detach().cpu().numpy() for name, t in zip(info.input_names, tensors)}


def onnxruntime_outputs(path: str, info, args: Sequence[Any], kwargs: Dict[str, Any]) -> List[np.ndarray]:
    """Run ``path`` in onnxruntime (CPU) on the example inputs."""
    import onnxruntime as ort
    try:
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(f"onnxruntime cannot load {path}: {first_line(e)}") from e
    return session.run(None, onnx_feed(info, args, kwargs))
