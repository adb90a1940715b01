"""Masked ONNX export: masks folded into the weights as exact +0.0 zeros, then verified.

``export_onnx(module, (x,), "model.onnx")``:

1. writes Sparse Parallel layers in the export form ``form`` (`exporters.forms`; default ``auto``:
   activated branches as trained, which idle DeepSparse cores run fastest, linear sums as
   ``stacked-conv``, one wide sparse conv and a fixed 1x1 conv that sums the branches), an equal
   function that DeepSparse runs fast and, unlike summed convs, correctly;
2. replaces every masked layer with the plain layer holding ``where(mask, W, 0)``, and rewrites
   in-place writes into slices out of place (`exporters.inplace_writes`: the exporter drops them);
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
   against torch, DeepSparse, in its worker process, compiles it and agrees with onnxruntime) and
   applies the outcome policy (`exporters.outcome`): each failed check the policy has a remedy for
   (static shapes, ``stacked-conv`` for branches DeepSparse gets wrong, Doped Linears as one
   matmul) is retried in one loop, the first attempt that verifies is published; a correct file
   only DeepSparse fails is published marked not for DeepSparse (unless ``deepsparse="require"``);
   anything else raises `VerificationFailed`. A ``form="auto"`` export keeps branches only where
   DeepSparse verified them (it writes ``stacked-conv`` where DeepSparse cannot check). Files
   appear whole, verified, or not at all.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from ..capture.tracer import graph_of
from ..compare import tensor_leaves
from ..config import config_of
from ..errors import ExportError, UserInputError, VerificationFailed, first_line
from ..io import check_writable
from ..module_tools import eval_mode
from ..sparsity.layers import bake_masks  # noqa: F401 (re-exported: it lived here)
from ..unit import bind_placeholders
from ..version import __version__
from .checks import Verification, verify_onnx
from .doped_form import concat_doped_linears, count_doped_linears
from .dynamic_shapes import UnsupportedSizeUse, has_symbolic_sizes, make_sizes_traceable, other_shape_inputs
from .forms import DEFAULT_FORM, SAFE_FORM, apply_form
from .outcome import Attempt, deepsparse_checked, deepsparse_failure, mark_not_for_deepsparse, next_remedy
from .inplace_writes import rewrite_slice_writes
from .inputs import inputs_metadata
from .runtimes import deepsparse_status
from .settings import SUPPORTED_OPSETS, ExportSettings  # noqa: F401  (SUPPORTED_OPSETS: re-exported)
from .weights import (META_EXPORT, META_INPUTS, META_LAYERS, LayerSparsity, layer_patterns, layers_to_metadata,
                      match_layers, set_metadata)

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
    outcome: str = "unchecked"                      # one of exporters.outcome.OUTCOMES
    deepsparse_reason: str = ""                     # why DeepSparse must not run the file (not-for-deepsparse)


def _positional(module: nn.Module, args, kwargs) -> Tuple[nn.Module, tuple, List[str]]:
    """(module to export, its tensor inputs as a positional tuple, their names) for the TorchScript
    exporter, which takes tensors only: keyword inputs of a compiled module keep their names
    (input_ids, timestep), and its other inputs (None, return_dict=False) are fixed in the file."""
    if isinstance(module, fx.GraphModule) and kwargs:
        values = bind_placeholders(module, tuple(args), dict(kwargs))
        names = [str(n.target).lstrip("*") for n in module.graph.nodes if n.op == "placeholder"]
        if len(names) == len(values):
            tensor_at = [i for i, v in enumerate(values) if isinstance(v, torch.Tensor)]
            exported = module if len(tensor_at) == len(values) else _TensorInputs(module, values, tensor_at)
            return exported, tuple(values[i] for i in tensor_at), [names[i] for i in tensor_at]
    if kwargs:
        raise UserInputError("export_onnx takes keyword inputs only for modules compiled by sift_compiler; "
                             "pass positional example inputs")
    names = ["input"] + [f"input_{i}" for i in range(1, len(args))]
    return module, tuple(args), names


class _TensorInputs(nn.Module):
    """``graph`` called with tensors only: its other placeholders keep the example's values."""

    def __init__(self, graph: fx.GraphModule, values: List[Any], tensor_at: List[int]) -> None:
        super().__init__()
        self.graph_module = graph
        self._values, self._tensor_at = list(values), list(tensor_at)

    def forward(self, *tensors: torch.Tensor) -> Any:
        values = list(self._values)
        for index, tensor in zip(self._tensor_at, tensors):
            values[index] = tensor
        return self.graph_module(*values)


def positive_zeros(model) -> int:
    """Rewrite -0.0 to +0.0 in every float initializer; returns how many entries changed."""
    from onnx import numpy_helper  # lazy (see _save)
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
    import onnx  # lazy: onnx takes 0.2 s to import, and `import sift_compiler` does not need it
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
    meta: Dict[str, Any] = {"sift_compiler": __version__, "form": form, "opset": opset, "torch": torch.__version__}
    config = config_of(module)
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
    doped_linears: int = 0          # Sparse Doped Linears written as trained (what the concat remedy changes)


def _prepare(module: nn.Module, args: tuple, kwargs: dict, settings: ExportSettings) -> _Prepared:
    """Apply the export forms, bake masks, name inputs and outputs, and run torch for the reference."""
    form, dynamic_batch = settings.form, settings.dynamic_batch
    input_names, verify = settings.input_names, settings.verify
    notes: List[str] = []
    graph = graph_of(module, args, kwargs)  # a native model (its own class) is read back as its graph
    formed, branch_groups, stacked_groups, doped_linears = graph, [], [], 0
    if isinstance(graph, fx.GraphModule) and form != "branches":
        result = apply_form(graph, form)
        formed, branch_groups, stacked_groups = result.module, result.branch_groups, result.rewritten
        notes += result.notes
    if isinstance(formed, fx.GraphModule):
        if settings.doped == "concat":
            formed, done = concat_doped_linears(formed)
            notes += [f"{name}: Sparse Doped Linear written as one matmul over [x, U x]" for name in done]
        else:
            doped_linears = count_doped_linears(formed)
    patterns = layer_patterns(formed)
    baked = bake_masks(formed, inplace=formed is not module).eval()  # the forms copied; graph_of made a new graph
    del graph
    del formed
    if isinstance(baked, fx.GraphModule):  # the TorchScript exporter drops writes into views
        writes = rewrite_slice_writes(baked)
        if writes.rewritten:
            notes.append(f"{writes.rewritten} in-place slice writes rewritten out of place for the exporter")
        notes += [f"in-place write left as written (the exporter may drop it): {why}" for why in writes.left]
    if dynamic_batch and has_symbolic_sizes(baked):
        try:
            make_sizes_traceable(baked)
        except UnsupportedSizeUse as e:
            dynamic_batch = False
            notes.append(f"static input shapes {_shapes((args, kwargs))}: the graph passes a symbolic size to "
                         f"{e}, which the TorchScript exporter would fix at the example's value")
    exported, inputs, names = _positional(baked, args, kwargs)
    names = list(input_names) if input_names else names
    reference = None
    with torch.no_grad():
        outputs = tensor_leaves(exported(*inputs))
        if verify:  # the trained module itself, not the export form: checks prove the form changes nothing
            with eval_mode(module):
                reference = [t.detach().cpu().numpy() for t in tensor_leaves(module(*args, **kwargs))]
    output_names = ["output"] + [f"output_{i}" for i in range(1, len(outputs))]
    other_shape = None
    if verify and dynamic_batch:  # a file that declares dynamic axes must also run at another shape
        other_args, other_kwargs = other_shape_inputs((args, kwargs))
        try:
            with torch.no_grad(), eval_mode(module):
                other_reference = [t.detach().cpu().numpy() for t in tensor_leaves(module(*other_args, **other_kwargs))]
        except Exception as e:  # the model itself fixes a size (a hard-coded view, say)
            dynamic_batch = False
            notes.append(f"static input shapes {_shapes((args, kwargs))}: the model does not run at "
                         f"{_shapes((other_args, other_kwargs))} in torch ({type(e).__name__}: "
                         f"{first_line(e, 200)})")
        else:
            _, other_inputs, _ = _positional(baked, other_args, other_kwargs)
            other_shape = ({n: x.detach().cpu().numpy() for n, x in zip(names, other_inputs)}, other_reference)
    axes = _dynamic_axes(names, inputs, output_names, outputs) if dynamic_batch else {}
    return _Prepared(exported, inputs, names, output_names, axes, patterns, reference, notes, branch_groups,
                     stacked_groups, other_shape, doped_linears)


def _shapes(tree) -> str:
    return ", ".join(str(tuple(x.shape)) for x in tensor_leaves(tree))


def _write_staged(prep: _Prepared, stage: str, target_name: str, settings: ExportSettings, metadata: Dict[str, Any]):
    """Export into ``stage``, fix zeros, record layers and inputs.

    Returns (model path, data path or None, layer records, unmatched layers, IR version).
    """
    import onnx  # lazy (see _save)
    raw = os.path.join(stage, "raw", "model.onnx")
    os.mkdir(os.path.dirname(raw))  # the TorchScript exporter spills one file per tensor here for > 2 GB
    _torch_export(prep.baked, prep.inputs, raw, prep.names, prep.output_names, prep.axes, settings.opset,
                  settings.fold_batch_norm)
    prep.baked = None  # free the copy before the ONNX model is in memory
    model = onnx.load(raw)
    shutil.rmtree(os.path.dirname(raw))
    changed = positive_zeros(model)
    if changed:
        prep.notes.append(f"{changed} negative zeros (from BatchNorm folding) rewritten as +0.0")
    layers, missing = match_layers(prep.patterns, model)
    set_metadata(model, META_LAYERS, layers_to_metadata(layers))
    set_metadata(model, META_INPUTS, inputs_metadata(prep.names, prep.inputs))
    set_metadata(model, META_EXPORT, metadata)
    staged_model = os.path.join(stage, target_name)
    staged_data = _save(model, staged_model, settings.external_data)
    return staged_model, staged_data, layers, missing, model.ir_version


def export_onnx(module: nn.Module, example_inputs: Any, path: str, example_kwargs: Optional[Dict[str, Any]] = None,
                *, settings: Optional[ExportSettings] = None, **options: Any) -> ExportInfo:
    """Export ``module`` to ONNX at ``path``, masks as exact zeros, and verify the file (module docstring).

    The options are an `ExportSettings` (``settings=``) or its fields as keywords (``opset=13``,
    ``form="stacked-conv"``, ``deepsparse="skip"``...). ``form``: how Sparse Parallel layers are written (`exporters.forms.FORMS`); ``external_data``:
    None decides by size; ``verify``: run the checks of `exporters.checks` on the file before it
    is published; ``deepsparse``: "auto", "require" or "skip". What happens when a check fails is
    the outcome policy (`exporters.outcome`): remedies are tried; a file only DeepSparse fails is
    written and marked (``info.outcome == "not-for-deepsparse"``) unless ``deepsparse="require"``;
    otherwise, with ``strict``, `VerificationFailed` is raised and nothing is written (without
    ``strict`` the file is written and the failures are in ``info.verification``).

    >>> info = sift.export_onnx(result.module, (x,), "model.sift.onnx")
    >>> print(info.outcome, info.verification.table())
    """
    settings = ExportSettings.of(settings, **options)
    check_writable(path, "ONNX file")
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs or ())
    unchecked = _why_deepsparse_cannot_check(settings.verify, settings.deepsparse) if settings.form == "auto" else ""
    if unchecked:  # branches nobody can verify on DeepSparse here are not shipped: use the form with no bug to meet
        settings = dataclasses.replace(settings, form=SAFE_FORM)
    directory = os.path.dirname(os.path.abspath(path))
    attempts: List[_Staged] = []
    notes: List[str] = []      # notes[i]: why attempt i + 1 was made
    applied: List[str] = []    # remedies applied so far, in order
    try:
        while True:
            staged = _export_attempt(module, args, dict(example_kwargs or {}), path, settings)
            attempts.append(staged)
            if len(attempts) == 1 and unchecked and staged.stacked_groups:
                staged.info.notes.insert(0, f"form auto: {len(staged.stacked_groups)} Sparse Parallel layers "
                                            f"written as {SAFE_FORM}, not as branches, because DeepSparse cannot "
                                            f"verify the branch form here ({unchecked})")
            if not settings.verify or staged.info.verification.ok:
                break
            staged.attempt.remedies = list(applied)
            remedy = next_remedy(staged.attempt)
            if remedy is None:
                break
            notes.append(remedy.note)
            applied.append(remedy.name)
            settings = dataclasses.replace(settings, **remedy.changes)
        chosen = _choose(attempts, path, settings.strict, settings.deepsparse)
        chosen.info.notes[:0] = notes[:attempts.index(chosen)]
        if chosen.info.outcome == "not-for-deepsparse":
            mark_not_for_deepsparse(chosen.model_path, chosen.info.deepsparse_reason)
        _publish(([chosen.data_path] if chosen.data_path else []) + [chosen.model_path], directory)
    finally:
        for staged in attempts:
            shutil.rmtree(staged.stage, ignore_errors=True)
    return chosen.info


@dataclass
class _Staged:
    """One export attempt, written into its own staging folder and verified there."""

    stage: str
    model_path: str
    data_path: Optional[str]
    info: ExportInfo
    attempt: Attempt
    stacked_groups: List[str]


def _export_attempt(module: nn.Module, args: tuple, kwargs: dict, path: str, settings: ExportSettings) -> _Staged:
    """Prepare, write and verify one export with ``settings`` in a staging folder."""
    verify = settings.verify
    prep = _prepare(module, args, kwargs, settings)
    metadata = _export_metadata(module, settings.form, settings.opset)
    if settings.doped != "trained":
        metadata["doped"] = settings.doped
    if not settings.dynamic_batch:
        metadata["static_shapes"] = True
    directory = os.path.dirname(os.path.abspath(path))
    stage = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    try:
        model_path, data_path, layers, missing, ir_version = _write_staged(prep, stage, os.path.basename(path),
                                                                           settings, metadata)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    final_data = os.path.join(directory, os.path.basename(data_path)) if data_path else None
    info = ExportInfo(path, settings.opset, ir_version, prep.names, prep.output_names, prep.notes,
                      settings.form, final_data, layers)
    if verify:
        feeds = {n: x.detach().cpu().numpy() for n, x in zip(prep.names, prep.inputs)}
        info.verification = verify_onnx(model_path, feeds, reference=prep.reference, layers=layers,
                                        missing=missing, rtol=settings.rtol, deepsparse=settings.deepsparse,
                                        min_supported_ops=settings.min_supported_ops, other_shape=prep.other_shape)
        info.verification.path = path
        for check in info.verification.checks:  # messages name the file the user asked for, not the staged copy
            check.detail = check.detail.replace(model_path, path)
    attempt = Attempt(settings, info.verification, prep.branch_groups, prep.doped_linears,
                      _shapes(prep.inputs))
    return _Staged(stage, model_path, data_path, info, attempt, prep.stacked_groups)


def _choose(attempts: List[_Staged], path: str, strict: bool, deepsparse: str) -> _Staged:
    """The attempt to publish, with its outcome set; `VerificationFailed` when none may be published."""
    last = attempts[-1]
    if last.info.verification is None or last.info.verification.ok:
        checked = deepsparse_checked(last.info.verification)
        last.info.outcome = ("remedied" if len(attempts) > 1 else "ok") if checked else "unchecked"
        return last
    # no attempt verified: the first correct one (only DeepSparse failed) is the file to write
    correct = next((a for a in attempts if deepsparse_failure(a.info.verification) is not None), None)
    if correct is not None and deepsparse != "require":
        correct.info.outcome = "not-for-deepsparse"
        correct.info.deepsparse_reason = deepsparse_failure(correct.info.verification)
        return correct
    if not strict:
        chosen = correct or attempts[0]
        chosen.info.outcome = "failed"
        return chosen
    failures = last.info.verification.failures()
    tried = [a.attempt.settings for a in attempts[1:]]
    hint = ""
    if correct is not None:
        hint = (" (only DeepSparse's checks fail: the file is correct for onnxruntime; without --deepsparse require "
                "it is written and marked not for DeepSparse)")
    if tried:
        hint += f"; remedies tried: {', '.join(s.describe() for s in tried)}"
    error = VerificationFailed(f"{path}: the exported file fails verification, not written: "
                               + "; ".join(failures) + hint)
    error.verification = last.info.verification
    raise error


def _why_deepsparse_cannot_check(verify: bool, deepsparse: str) -> str:
    """Why DeepSparse will not compare its outputs with onnxruntime's on this export ("" if it will)."""
    if not verify:
        return "verify=False"
    if deepsparse == "skip":
        return "its check was skipped"
    usable, reason = deepsparse_status()
    return "" if usable else reason
