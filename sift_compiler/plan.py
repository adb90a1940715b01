"""The plan of a compiled model: how to make it again (the dense model's source, the compile
options, the example input specs, the output form), as plain JSON-able data.

`serialize` writes it into ``.sift.pt`` files and Hugging Face ``config.sift``; the checkpoint
folders of `exporters.checkpoints` write it to ``sift_plan.json``. It sits low (beside capture) so
that both can read it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Tuple

import torch
import torch.nn as nn

from .capture.sources import example_inputs
from .config import CompileConfig
from .version import __version__

FORMAT = "sift-compiler/1"


def _describe_input(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return {"shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", "")}
    return x


def _make_input(d: Any, model: nn.Module) -> Any:
    if isinstance(d, dict) and set(d) == {"shape", "dtype"}:
        dtype = getattr(torch, d["dtype"])
        (x,), _ = example_inputs(model, "plain", tuple(d["shape"]), dtype)
        return x
    return d


def plan_of(result) -> Dict[str, Any]:
    """How to make ``result`` again: the dense model's source, the compile options, the example
    input specs and the output form. Plain JSON-able data."""
    unit = result.unit
    return {
        "format": FORMAT,
        "source": result.source,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(result.config).items()},
        "capture_method": result.capture_method,
        "output": result.output,
        "inputs": {"args": [_describe_input(a) for a in unit.args],
                   "kwargs": {k: _describe_input(v) for k, v in unit.kwargs.items()}},
        "versions": {"sift_compiler": __version__, "torch": str(torch.__version__)},
    }


def plan_inputs(plan: Dict[str, Any], model: nn.Module) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
    """Example inputs of the plan's shapes and dtypes, made for ``model`` (token ids within its vocabulary)."""
    args = tuple(_make_input(a, model) for a in plan["inputs"]["args"])
    return args, {k: _make_input(v, model) for k, v in plan["inputs"]["kwargs"].items()}


def plan_config(plan: Dict[str, Any]) -> CompileConfig:
    """The `CompileConfig` a plan was compiled with."""
    cfg = {k: (tuple(v) if isinstance(v, list) else v) for k, v in plan["config"].items()
           if k in CompileConfig.__dataclass_fields__}  # files from older versions may carry removed options
    return CompileConfig(**cfg)
