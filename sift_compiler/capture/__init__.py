"""Capture any PyTorch model as a canonical torch.fx graph (see `tracer.capture`)."""
from .sources import ModelSource, load_model
from .tracer import CaptureResult, SiftTracer, capture, graph_of, leaf_module, symbolic_trace

__all__ = ["ModelSource", "load_model", "CaptureResult", "SiftTracer", "capture", "graph_of", "leaf_module", "symbolic_trace"]
