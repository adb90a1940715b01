"""Masked ONNX export: masks folded into the weights as exact +0.0 zeros.

``export_onnx(module, (x,), "model.onnx")`` copies the module, replaces every masked layer with
the plain layer holding ``where(mask, W, 0)``, and exports with the TorchScript exporter
(``dynamo=False``, opset 13 to 17: what DeepSparse 1.8 and onnxruntime both load; IR <= 9), with a
dynamic batch axis and Conv+BatchNorm folded. Folding multiplies rows by a scale that may be
negative, which turns +0.0 into -0.0; a final pass rewrites every -0.0 initializer entry to +0.0
so sparsity detectors that compare bits see zeros. The file is written atomically.
"""
from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

from ..errors import ExportError, UserInputError
from ..io import atomic_path, check_writable
from ..sparsity.layers import MaskedLayer, iter_masked, plain_copy
from ..unit import bind_placeholders

SUPPORTED_OPSETS = range(13, 18)


@dataclass
class ExportInfo:
    path: str
    opset: int
    ir_version: int
    input_names: List[str]
    output_names: List[str]
    notes: List[str] = field(default_factory=list)


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def bake_masks(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` in which masked layers are plain layers with exact zeros."""
    baked = copy.deepcopy(module)
    for name, layer in list(iter_masked(baked)):
        _set_submodule(baked, name, plain_copy(layer))
    return baked


def _has_symbolic_sizes(module: nn.Module) -> bool:
    """torch.export graphs read sizes with aten.sym_size, which the TorchScript tracer bakes in."""
    return isinstance(module, fx.GraphModule) and any(
        n.op == "call_function" and n.target is torch.ops.aten.sym_size.int for n in module.graph.nodes)


def _positional(module: nn.Module, args, kwargs):
    """Inputs as a positional tuple, with names, for the TorchScript exporter."""
    if isinstance(module, fx.GraphModule) and kwargs:  # keyword inputs keep their names (input_ids)
        values = bind_placeholders(module, tuple(args), dict(kwargs))
        names = [str(n.target).lstrip("*") for n in module.graph.nodes if n.op == "placeholder"]
        if len(names) == len(values):
            keep = [(n, v) for n, v in zip(names, values) if isinstance(v, torch.Tensor)]
            if len(keep) == len(values):
                return tuple(v for _, v in keep), [n for n, _ in keep]
    if kwargs:
        raise UserInputError("export_onnx takes keyword inputs only for modules compiled by sift_compiler; "
                             "pass positional example inputs")
    names = ["input"] + [f"input_{i}" for i in range(1, len(args))]
    return tuple(args), names


def positive_zeros(model) -> int:
    """Rewrite -0.0 to +0.0 in every float initializer; returns how many entries changed."""
    from onnx import numpy_helper
    changed = 0
    for index, init in enumerate(model.graph.initializer):
        array = numpy_helper.to_array(init)
        if array.dtype.kind != "f":
            continue
        negative_zero = (array == 0) & np.signbit(array)
        count = int(negative_zero.sum())
        if count:
            fixed = np.where(negative_zero, np.zeros((), array.dtype), array)
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(fixed, init.name))
            changed += count
    return changed


def export_onnx(module: nn.Module, example_inputs: Any, path: str, example_kwargs: Optional[Dict[str, Any]] = None,
                *, opset: int = 17, dynamic_batch: bool = True, input_names: Optional[Sequence[str]] = None,
                fold_batch_norm: bool = True) -> ExportInfo:
    """Export ``module`` to ONNX at ``path`` with masks as exact zeros (see the module docstring).

    >>> sift.export_onnx(result.module, (x,), "model.sift.onnx")
    """
    import onnx
    if opset not in SUPPORTED_OPSETS:
        raise UserInputError(f"opset {opset} is not supported: use 13 to 17 (DeepSparse 1.8 loads <= 19, "
                             "the TorchScript exporter is reliable up to 17)")
    check_writable(path, "ONNX file")
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs or ())
    baked = bake_masks(module).eval()
    notes = []
    if dynamic_batch and _has_symbolic_sizes(baked):
        dynamic_batch = False
        shapes = ", ".join(str(tuple(x.shape)) for x in args + tuple((example_kwargs or {}).values())
                           if isinstance(x, torch.Tensor))
        notes.append(f"static input shapes {shapes}: graphs captured by torch.export export with fixed "
                     "batch and sequence length (the TorchScript tracer bakes their symbolic sizes)")
    inputs, names = _positional(baked, args, dict(example_kwargs or {}))
    names = list(input_names) if input_names else names
    with torch.no_grad():
        outputs = [t for t in pytree.tree_leaves(baked(*inputs)) if isinstance(t, torch.Tensor)]
    output_names = ["output"] + [f"output_{i}" for i in range(1, len(outputs))]
    axes = {}
    if dynamic_batch:
        axes = {n: {0: "batch"} for n, x in zip(names, inputs) if x.dim() > 0}
        axes.update({n: {0: "batch"} for n, y in zip(output_names, outputs) if y.dim() > 0})
        # token ids (batch, sequence): the sequence length is dynamic too
        lengths = {x.shape[1] for x in inputs if x.dim() == 2 and not x.is_floating_point()}
        for n, x in zip(names, inputs):
            if x.dim() == 2 and not x.is_floating_point():
                axes[n][1] = "sequence"
        for n, y in zip(output_names, outputs):
            if y.dim() >= 2 and y.shape[1] in lengths:
                axes[n][1] = "sequence"
    with atomic_path(path) as tmp:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(baked, inputs, tmp, dynamo=False, opset_version=opset, input_names=names,
                                  output_names=output_names, dynamic_axes=axes or None,
                                  do_constant_folding=fold_batch_norm)
        except Exception as e:
            raise ExportError(f"torch.onnx.export failed for {type(module).__name__}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from e
        model = onnx.load(tmp)
        changed = positive_zeros(model)
        if changed:
            onnx.save(model, tmp)
    if changed:
        notes.append(f"{changed} negative zeros (from BatchNorm folding) rewritten as +0.0")
    return ExportInfo(path, opset, model.ir_version, names, output_names, notes)
