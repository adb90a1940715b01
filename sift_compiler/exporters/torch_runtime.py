"""torch as a runtime for a compiled model, beside the ONNX engines: eager, torch.compile, CSR linears.

The module is the compiled model with its masks baked (plain layers with exact zeros: what a user
deploying with torch runs). ``torch-csr`` stores every Linear weight in CSR and multiplies with
``torch.sparse.mm`` (MKL's sparse kernels on CPU: they skip the zeros); convolutions have no CSR
kernel in torch and stay dense. Inputs arrive as the ONNX file's feeds (numpy, by name) and are
passed positionally in that order, as the exporter traced them; outputs are every tensor the model
returns, flattened, as numpy arrays.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..errors import UserInputError
from ..sparsity.layers import bake_masks


class CSRLinear(nn.Module):
    """``y = x W^T + b`` with W in CSR (inference only)."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        with warnings.catch_warnings():  # "CSR support is in beta": said once in the docs, not per layer
            warnings.simplefilter("ignore", UserWarning)
            self.weight = layer.weight.detach().to_sparse_csr()
        self.bias = None if layer.bias is None else layer.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = torch.sparse.mm(self.weight, flat.t()).t()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def with_csr_linears(module: nn.Module) -> Tuple[nn.Module, int]:
    """``module`` (changed in place) with every nn.Linear as a `CSRLinear`; and how many there were."""
    names = [name for name, m in module.named_modules() if type(m) is nn.Linear]
    for name in names:
        module.set_submodule(name, CSRLinear(module.get_submodule(name)))
    return module, len(names)


def _flatten(outputs) -> List[np.ndarray]:
    if hasattr(outputs, "to_tuple"):           # a Hugging Face ModelOutput
        outputs = outputs.to_tuple()
    leaves, _ = torch.utils._pytree.tree_flatten(outputs)
    return [t.detach().numpy() for t in leaves if isinstance(t, torch.Tensor)]


def open_torch(module: Optional[nn.Module], name: str, num_cores: Optional[int]
               ) -> Tuple[Callable[[Dict[str, np.ndarray]], List[np.ndarray]], str]:
    """(run(feeds) -> outputs, description) for engine ``name``: torch, torch-compile or torch-csr."""
    if module is None:
        raise UserInputError(f"{name} runs the compiled torch model, not an ONNX file: give it the model that "
                             "sift-compile -o wrote (MODEL.sift.pt beside MODEL.onnx), or a MODEL spec")
    if num_cores:
        torch.set_num_threads(num_cores)
    cached = _OPENED.get(module, {}).get(name)
    if cached is not None:  # the same module again (sift-bench --rounds): no second bake, no recompile
        return cached
    baked = bake_masks(module).eval()
    describe = f"torch {torch.__version__.split('+')[0]} CPU eager"
    if name == "torch-csr":
        baked, count = with_csr_linears(baked)
        describe += f", {count} Linear weights in CSR (convs dense)"
    runner: Callable = baked
    if name == "torch-compile":
        runner = torch.compile(baked, dynamic=False)
        describe = f"torch {torch.__version__.split('+')[0]} CPU torch.compile (inductor)"

    def run(feeds: Dict[str, np.ndarray]) -> List[np.ndarray]:
        with torch.inference_mode():
            return _flatten(runner(*[torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values()]))
    _OPENED.setdefault(module, {})[name] = (run, describe)
    return run, describe


_OPENED: "weakref.WeakKeyDictionary[nn.Module, Dict[str, tuple]]" = weakref.WeakKeyDictionary()
