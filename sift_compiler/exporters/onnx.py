"""Masked ONNX export: masks folded into the weights as exact +0.0 zeros, then verified.

``export_onnx(module, (x,), "model.onnx")``:

1. writes Sparse Parallel layers in the export form ``form`` (`exporters.forms`; default ``auto``:
   activated branches as trained, which idle DeepSparse cores run fastest, linear sums as
   ``stacked-conv``, one wide sparse conv and a fixed 1x1 conv that sums the branches), an equal
   function that DeepSparse runs fast and, unlike summed convs, correctly;
2. replaces every masked layer with the plain layer holding ``where(mask, W, 0)``;
3. exports with the TorchScript exporter (``dynamo=False``, opset 13 to 17: what DeepSparse 1.8
   and onnxruntime both load, IR <= 9) with a dynamic batch axis (and sequence axis for token
   ids; torch.export graphs first get traceable sizes, `exporters.dynamic_shapes`) and
   Conv+BatchNorm folded.
   Folding scales rows, so zeros stay zeros, but a negative scale turns +0.0 into -0.0: every
   -0.0 is rewritten to +0.0 so detectors that compare bits see zeros;
4. records in the file's metadata which initializer holds which sparse layer (``sift.layers``)
   and what the inputs are (``sift.inputs``), so `sift-check` can test the file on its own;
5. writes the weights to one external ``<name>.data`` file when they pass 2 GB (protobuf's
   limit), or when ``external_data=True``;
6. verifies the written file (`exporters.checks`: onnx checker, per-layer sparsity, onnxruntime
   against torch, DeepSparse compiles it and agrees with onnxruntime) and, with ``strict``,
   refuses to publish a file that fails. A ``form="auto"`` export keeps branches only where
   DeepSparse verified them: if DeepSparse disagrees with onnxruntime, or cannot check the file,
   it is written as ``stacked-conv``; a file whose dynamic axes fail at a second input shape
   is written with the example's fixed shapes. Files appear whole, verified, or not at all.
"""
from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

from ..errors import ExportError, UserInputError, first_line
from ..capture.tracer import graph_of
from ..io import check_writable
from ..sparsity.layers import iter_masked, plain_copy
from ..unit import bind_placeholders
from .checks import DEFAULT_RTOL, OTHER_SHAPE_CHECK, Verification, verify_onnx
from .dynamic_shapes import UnsupportedSizeUse, has_symbolic_sizes, make_sizes_traceable, other_shape_inputs
from .forms import DEFAULT_FORM, FORMS, SAFE_FORM, apply_form
from .inputs import inputs_metadata
from .runtimes import deepsparse_status
from .weights import (META_EXPORT, META_INPUTS, META_LAYERS, LayerSparsity, layer_patterns, layers_to_metadata,
                      match_layers, set_metadata)

SUPPORTED_OPSETS = range(13, 18)
PROTOBUF_LIMIT = 2 ** 31 - 1
# Weights above this go to external data: the graph, names and metadata need room under 2 GB too.
EXTERNAL_DATA_THRESHOLD = int(1.9 * 2 ** 30)


@dataclass
class ExportInfo:
    """What `export_onnx` wrote and what it found when it checked the file."""

    path: str
    opset: int
    ir_version: int
    input_names: List[str]
    output_names: List[str]
    notes: List[str] = field(default_factory=list)
    form: str = DEFAULT_FORM
    data_path: Optional[str] = None                 # the external data file, if any
    layers: List[LayerSparsity] = field(default_factory=list)
    verification: Optional[Verification] = None


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def bake_masks(module: nn.Module, inplace: bool = False) -> nn.Module:
    """A deep copy of ``module`` (or ``module`` itself) in which masked layers are plain layers with exact zeros."""
    baked = module if inplace else copy.deepcopy(module)
    for name, layer in list(iter_masked(baked)):
        _set_submodule(baked, name, plain_copy(layer))
    return baked


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


def _dynamic_axes(names, inputs, output_names, outputs) -> Dict[str, Dict[int, str]]:
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
    return axes


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    """Evaluate ``module`` in eval mode and give every submodule its training flag back."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, flag in flags:
            m.training = flag


def _tensors(tree) -> List[torch.Tensor]:
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _torch_export(baked: nn.Module, inputs, raw: str, names, output_names, axes, opset: int, fold: bool) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(baked, inputs, raw, dynamo=False, opset_version=opset, input_names=names,
                              output_names=output_names, dynamic_axes=axes or None, do_constant_folding=fold)
    except Exception as e:
        raise ExportError(f"torch.onnx.export failed for {type(baked).__name__}: {type(e).__name__}: "
                          f"{first_line(e)}") from e


def _save(model, target: str, external_data: Optional[bool]) -> Optional[str]:
    """Save ``model`` at ``target``; weights in ``<target>.data`` when asked or above the threshold."""
    import onnx
    size = sum(len(init.raw_data) or init.ByteSize() for init in model.graph.initializer)
    external = size > EXTERNAL_DATA_THRESHOLD if external_data is None else external_data
    if not external:
        onnx.save_model(model, target)
        return None
    location = os.path.basename(target) + ".data"
    onnx.save_model(model, target, save_as_external_data=True, all_tensors_to_one_file=True, location=location,
                    size_threshold=0)
    return os.path.join(os.path.dirname(target), location)


def _publish(staged: List[str], directory: str) -> None:
    """Move the staged files into ``directory``, the model file last (its data must be there first)."""
    for path in staged:
        os.replace(path, os.path.join(directory, os.path.basename(path)))


def _export_metadata(module: nn.Module, form: str, opset: int) -> Dict[str, Any]:
    from .. import __version__
    meta: Dict[str, Any] = {"sift_compiler": __version__, "form": form, "opset": opset, "torch": torch.__version__}
    config = getattr(module, "sift_config", None)
    if config is not None:
        meta.update(transform=config.transform, sparsity=config.sparsity, seed=config.seed)
    return meta


@dataclass
class _Prepared:
    """The module as it will be exported, and what the checks need from torch."""

    baked: nn.Module
    inputs: tuple
    names: List[str]
    output_names: List[str]
    axes: Dict[str, Dict[int, str]]
    patterns: list
    reference: Optional[List[np.ndarray]]
    notes: List[str]
    branch_groups: List[str]
    stacked_groups: List[str]
    other_shape: Optional[Tuple[Dict[str, np.ndarray], List[np.ndarray]]] = None  # (feeds, torch outputs)


def _prepare(module: nn.Module, args: tuple, kwargs: dict, form: str, dynamic_batch: bool,
             input_names: Optional[Sequence[str]], verify: bool) -> _Prepared:
    """Apply the export form, bake masks, name inputs and outputs, and run torch for the reference."""
    notes: List[str] = []
    graph = graph_of(module, args, kwargs)  # a native model (its own class) is read back as its graph
    formed, branch_groups, stacked_groups = graph, [], []
    if isinstance(graph, fx.GraphModule) and form != "branches":
        result = apply_form(graph, form)
        formed, branch_groups, stacked_groups = result.module, result.branch_groups, result.rewritten
        notes += result.notes
    patterns = layer_patterns(formed)
    baked = bake_masks(formed, inplace=formed is not module).eval()  # apply_form copied; graph_of made a new graph
    del graph
    del formed
    if dynamic_batch and has_symbolic_sizes(baked):
        try:
            make_sizes_traceable(baked)
        except UnsupportedSizeUse as e:
            dynamic_batch = False
            notes.append(f"static input shapes {_shapes((args, kwargs))}: the graph passes a symbolic size to "
                         f"{e}, which the TorchScript exporter would fix at the example's value")
    inputs, names = _positional(baked, args, kwargs)
    names = list(input_names) if input_names else names
    reference = None
    with torch.no_grad():
        outputs = _tensors(baked(*inputs))
        if verify:  # the trained module itself, not the export form: checks prove the form changes nothing
            with _eval_mode(module):
                reference = [t.detach().cpu().numpy() for t in _tensors(module(*args, **kwargs))]
    output_names = ["output"] + [f"output_{i}" for i in range(1, len(outputs))]
    other_shape = None
    if verify and dynamic_batch:  # a file that declares dynamic axes must also run at another shape
        other_args, other_kwargs = other_shape_inputs((args, kwargs))
        try:
            with torch.no_grad(), _eval_mode(module):
                other_reference = [t.detach().cpu().numpy() for t in _tensors(module(*other_args, **other_kwargs))]
        except Exception as e:  # the model itself fixes a size (a hard-coded view, say)
            dynamic_batch = False
            notes.append(f"static input shapes {_shapes((args, kwargs))}: the model does not run at "
                         f"{_shapes((other_args, other_kwargs))} in torch ({type(e).__name__}: "
                         f"{first_line(e, 200)})")
        else:
            other_inputs, _ = _positional(baked, other_args, other_kwargs)
            other_shape = ({n: x.detach().cpu().numpy() for n, x in zip(names, other_inputs)}, other_reference)
    axes = _dynamic_axes(names, inputs, output_names, outputs) if dynamic_batch else {}
    return _Prepared(baked, inputs, names, output_names, axes, patterns, reference, notes, branch_groups,
                     stacked_groups, other_shape)


def _shapes(tree) -> str:
    return ", ".join(str(tuple(x.shape)) for x in _tensors(tree))


def _write_staged(prep: _Prepared, stage: str, target_name: str, settings: Dict[str, Any]):
    """Export into ``stage``, fix zeros, record layers and inputs.

    Returns (model path, data path or None, layer records, unmatched layers, IR version).
    """
    import onnx
    raw = os.path.join(stage, "raw", "model.onnx")
    os.mkdir(os.path.dirname(raw))  # the TorchScript exporter spills one file per tensor here for > 2 GB
    _torch_export(prep.baked, prep.inputs, raw, prep.names, prep.output_names, prep.axes, settings["opset"],
                  settings["fold_batch_norm"])
    prep.baked = None  # free the copy before the ONNX model is in memory
    model = onnx.load(raw)
    shutil.rmtree(os.path.dirname(raw))
    changed = positive_zeros(model)
    if changed:
        prep.notes.append(f"{changed} negative zeros (from BatchNorm folding) rewritten as +0.0")
    layers, missing = match_layers(prep.patterns, model)
    set_metadata(model, META_LAYERS, layers_to_metadata(layers))
    set_metadata(model, META_INPUTS, inputs_metadata(prep.names, prep.inputs))
    set_metadata(model, META_EXPORT, settings["metadata"])
    staged_model = os.path.join(stage, target_name)
    staged_data = _save(model, staged_model, settings["external_data"])
    return staged_model, staged_data, layers, missing, model.ir_version


def export_onnx(module: nn.Module, example_inputs: Any, path: str, example_kwargs: Optional[Dict[str, Any]] = None,
                *, opset: int = 17, dynamic_batch: bool = True, input_names: Optional[Sequence[str]] = None,
                fold_batch_norm: bool = True, form: str = DEFAULT_FORM, external_data: Optional[bool] = None,
                verify: bool = True, strict: bool = True, rtol: float = DEFAULT_RTOL, deepsparse: str = "auto",
                min_supported_ops: Optional[float] = None) -> ExportInfo:
    """Export ``module`` to ONNX at ``path``, masks as exact zeros, and verify the file (module docstring).

    ``form``: how Sparse Parallel layers are written (`exporters.forms.FORMS`); ``external_data``:
    None decides by size; ``verify``: run the checks of `exporters.checks` on the file before it
    is published; ``strict``: raise `ExportError` (and write nothing) when one fails, else return
    the failures in ``info.verification``; ``deepsparse``: "auto", "require" or "skip".

    >>> info = sift.export_onnx(result.module, (x,), "model.sift.onnx")
    >>> print(info.verification.table())
    """
    if opset not in SUPPORTED_OPSETS:
        raise UserInputError(f"opset {opset} is not supported: use 13 to 17 (DeepSparse 1.8 loads <= 19, "
                             "the TorchScript exporter is reliable up to 17)")
    if form not in FORMS:
        raise UserInputError(f"unknown export form {form!r}: choose one of {', '.join(FORMS)}")
    check_writable(path, "ONNX file")
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs or ())
    unchecked = _why_deepsparse_cannot_check(verify, deepsparse) if form == "auto" else ""
    if unchecked:  # branches nobody can verify on DeepSparse here are not shipped: use the form with no bug to meet
        form = SAFE_FORM
    prep = _prepare(module, args, dict(example_kwargs or {}), form, dynamic_batch, input_names, verify)
    if unchecked and prep.stacked_groups:
        prep.notes.insert(0, f"form auto: {len(prep.stacked_groups)} Sparse Parallel layers written as {SAFE_FORM}, "
                             f"not as branches, because DeepSparse cannot verify the branch form here ({unchecked})")
    settings = {"opset": opset, "fold_batch_norm": fold_batch_norm, "external_data": external_data,
                "metadata": _export_metadata(module, form, opset)}
    directory = os.path.dirname(os.path.abspath(path))
    stage = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    retry: Optional[Tuple[Dict[str, Any], str]] = None  # (export_onnx arguments to change, note)
    try:
        staged_model, staged_data, layers, missing, ir_version = _write_staged(
            prep, stage, os.path.basename(path), settings)
        data_path = os.path.join(directory, os.path.basename(staged_data)) if staged_data else None
        info = ExportInfo(path, opset, ir_version, prep.names, prep.output_names, prep.notes, form, data_path, layers)
        if verify:
            feeds = {n: x.detach().cpu().numpy() for n, x in zip(prep.names, prep.inputs)}
            info.verification = verify_onnx(staged_model, feeds, reference=prep.reference, layers=layers,
                                            missing=missing, rtol=rtol, deepsparse=deepsparse,
                                            min_supported_ops=min_supported_ops, other_shape=prep.other_shape)
            info.verification.path = path
            retry = _retry_for(info.verification, form, prep)
            if retry is None and strict and not info.verification.ok:
                failures = info.verification.failures()
                hint = ""
                if any("deepsparse-vs-onnxruntime" in f for f in failures):
                    hint = (" (DeepSparse computes this graph differently from onnxruntime: a runtime bug, see "
                            "docs/deployment.md; for Sparse Wide try --round-to 8, or export for onnxruntime "
                            "only with --no-deepsparse-check)")
                error = ExportError(f"{path}: the exported file fails verification, not written: "
                                    + "; ".join(failures) + hint)
                error.verification = info.verification
                raise error
        if retry is None:
            _publish(([staged_data] if staged_data else []) + [staged_model], directory)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if retry is not None:
        arguments = dict(opset=opset, dynamic_batch=dynamic_batch, input_names=input_names,
                         fold_batch_norm=fold_batch_norm, form=form, external_data=external_data, verify=verify,
                         strict=strict, rtol=rtol, deepsparse=deepsparse, min_supported_ops=min_supported_ops)
        changes, note = retry
        again = export_onnx(module, example_inputs, path, example_kwargs, **{**arguments, **changes})
        again.notes.insert(0, note)
        return again
    return info


def _retry_for(verification: Verification, form: str, prep: _Prepared) -> Optional[Tuple[Dict[str, Any], str]]:
    """The export to try instead of publishing this one, with the note that says why (None: publish)."""
    if form == "auto" and prep.branch_groups and _failed(verification, "deepsparse-vs-onnxruntime"):
        # a runtime bug on the activated-branch form: the stacked form has no sum of layers to get wrong
        error = verification.errors["deepsparse-vs-onnxruntime"]
        return {"form": SAFE_FORM}, (f"DeepSparse disagreed with onnxruntime on the branch form of "
                                     f"{len(prep.branch_groups)} Sparse Parallel layers ({error.describe()}): "
                                     f"exported as {SAFE_FORM} instead")
    if _failed(verification, OTHER_SHAPE_CHECK):
        # the graph fixes a size somewhere (a hard-coded view, say): a file that runs only at the example's shape
        detail = next(c.detail for c in verification.checks if c.name == OTHER_SHAPE_CHECK)
        return {"dynamic_batch": False}, (f"static input shapes {_shapes(prep.inputs)}: the file did not run "
                                          f"correctly at another batch size or sequence length ({detail})")
    return None


def _failed(verification: Verification, check: str) -> bool:
    return any(c.name == check and not (c.ok or c.skipped) for c in verification.checks)


def _why_deepsparse_cannot_check(verify: bool, deepsparse: str) -> str:
    """Why DeepSparse will not compare its outputs with onnxruntime's on this export ("" if it will)."""
    if not verify:
        return "verify=False"
    if deepsparse == "skip":
        return "its check was skipped"
    usable, reason = deepsparse_status()
    return "" if usable else reason
