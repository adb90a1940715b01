"""Saving and loading compiled models without executing code from the file.

Format (``sift-compiler/1``): one ``torch.save`` file holding only plain data, readable with
``torch.load(path, weights_only=True)``::

    {"format": "sift-compiler/1",
     "plan": {"source": {"spec": "torchvision:resnet18", ...} or None,
              "config": {...CompileConfig...}, "inputs": {"args": [[shape, dtype]...], "kwargs": {...}},
              "versions": {"sift_compiler": ..., "torch": ...}},
     "state_dict": {name: tensor}}          # weights, BatchNorm statistics and masks

``load`` rebuilds the dense model from the plan's source (library models by name; a
``package.module:callable`` only with ``trust_source=True``; or the ``model=`` you pass),
re-runs the same deterministic compilation, and loads the state dict (strict).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from .config import CompileConfig
from .errors import ModelLoadError, first_line
from .io import atomic_path, check_writable

FORMAT = "sift-compiler/1"


def _describe_input(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return {"shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", "")}
    return x


def _make_input(d: Any, model: nn.Module) -> Any:
    if isinstance(d, dict) and set(d) == {"shape", "dtype"}:
        from .capture.sources import example_inputs
        dtype = getattr(torch, d["dtype"])
        (x,), _ = example_inputs(model, "plain", tuple(d["shape"]), dtype)
        return x
    return d


def save(result, path: str) -> None:
    """Write ``result`` (a `CompileResult`) to ``path`` in the format above, atomically."""
    check_writable(path, "model file")
    unit = result.unit
    plan = {
        "source": result.source,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(result.config).items()},
        "capture_method": result.capture_method,
        "inputs": {"args": [_describe_input(a) for a in unit.args],
                   "kwargs": {k: _describe_input(v) for k, v in unit.kwargs.items()}},
        "versions": {"sift_compiler": _version(), "torch": str(torch.__version__)},
    }
    state = {k: v.detach().cpu().clone() for k, v in result.module.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, "plan": plan, "state_dict": state}, tmp)


def _version() -> str:
    from . import __version__
    return __version__


def read(path: str) -> Dict[str, Any]:
    """The saved dict, read without executing code (weights_only)."""
    if not os.path.exists(path):
        raise ModelLoadError(f"compiled model file {path!r} does not exist")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(f"{path!r} is not a sift-compiler model file: {first_line(e)}") from None
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise ModelLoadError(f"{path!r} is not a sift-compiler model file (format {FORMAT})")
    return content


def _rebuild_source(source: Optional[Dict[str, Any]], trust_source: bool) -> nn.Module:
    from .capture.sources import FAMILIES, load_model
    if not source or not source.get("spec"):
        raise ModelLoadError("the file does not say how to rebuild the dense model: pass it as "
                             "sift_compiler.load(path, model=dense_model)")
    spec = source["spec"]
    family = spec.split(":", 1)[0]
    if family not in FAMILIES and not trust_source:
        raise ModelLoadError(f"rebuilding the dense model from {spec!r} would import and run that code; pass "
                             "trust_source=True if you trust it, or model=dense_model")
    return load_model(spec, trust_pickle=trust_source).module


def load(path: str, model: Optional[nn.Module] = None, trust_source: bool = False):
    """Load a compiled model written by `save`; returns a `CompileResult` (``.module`` is trainable).

    >>> result = sift_compiler.load("model.sift.pt")
    >>> sift_compiler.sparsity.masks(result.module)
    """
    from .api import compile
    content = read(path)
    plan = content["plan"]
    dense = model if model is not None else _rebuild_source(plan.get("source"), trust_source)
    args = [_make_input(a, dense) for a in plan["inputs"]["args"]]
    kwargs = {k: _make_input(v, dense) for k, v in plan["inputs"]["kwargs"].items()}
    cfg = dict(plan["config"])
    cfg = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items()
           if k in CompileConfig.__dataclass_fields__}  # files from older versions may carry removed options
    config = CompileConfig(**cfg)
    result = compile(dense, config.transform, config.sparsity, tuple(args), kwargs, seed=config.seed,
                     keep_dense=config.keep_dense, activation=config.activation, linear_norm=config.linear_norm,
                     round_to=config.round_to, attention_width=config.attention_width,
                     capture_method=plan.get("capture_method", "auto"), source=plan.get("source"))
    try:
        result.module.load_state_dict(content["state_dict"], strict=True)
    except RuntimeError as e:
        raise ModelLoadError(f"{path!r} does not match the rebuilt model: {first_line(e)}") from None
    result.unit.touch()
    from .api import current_report
    result.report = current_report(result.unit, result.report.model, result.capture_method)
    return result
