"""The native model: the user's own model with the graph's decisions replayed as module swaps.

The captured graph is where sift *decides* (first and last layers, coupled channel groups, FLOPs,
the compensation). What the user trains is their own model object: its class, forward code,
methods (``generate``, ``save_pretrained``), and module tree (what FSDP, activation checkpointing
and PEFT hook into). `build_native` replays the passes' rewrite log (`unit.RewriteLog`) on the
private copy that capture traced (`CaptureResult.model`):

1. every module a pass replaced goes to its path in the model. The module found there (or, for a
   functional call capture turned into a module, the module whose forward made it) must be the one
   the graph computed with: the same object (torch.fx), or the module owning the same parameters
   (torch.export). Sift's own modules (branches, factors, masked layers) replace it whole; a
   module Sparse Wide only resized keeps its class and forward with the new tensors and sizes
   (timm's BatchNormAct2d stays one). A functional call on parameters that no module owns has no
   module to swap: the graph form stays, and the note names the call's source line;
2. every parameter or buffer Sparse Wide widened (a class token, an RMSNorm weight) replaces the
   model's own;
3. every constant Sparse Wide changed in the graph (a size in a view or split, an attention scale)
   must be an attribute of a module whose forward computed it (``self.n_embd``, ``self.head_dim``,
   ``self.scaling``): those attributes take the new value. A literal written into the forward code
   cannot change: the graph form stays, and the note names the line;
4. library modules that capture rewrote (GPT-2's ``Conv1D``, ``nn.MultiheadAttention``) and that no
   rewrite touched are put back as they were; touched ones stay in their explicit form, which
   computes the same function (`capture.modules`).

`check_native` then runs both forms in eval mode on the example inputs and, when a size written
in the code was rewritten (Sparse Wide's literals), at a second batch (and sequence) size too;
they must agree to 1e-5 relative or the graph form stays, with a note. With module swaps only,
the native forward is the user's own code around the graph's modules, so a second size would
check the user's code, which the capture already ran, at the cost of two more forwards of a
model with 4-10x the dense weights (most of a compile's time). The two forms share their
modules and tensors: the same weights and masks, not copies.
"""
from __future__ import annotations

import contextlib
import copy
import io
import inspect
import math
import re
import traceback
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .module_tools import eval_mode, submodule_or_none
from .compare import compare_to_reference, tensor_leaves
from .config import OUTPUTS  # noqa: F401  (re-exported: the forms compile returns)
from .errors import first_line
from .exporters.dynamic_shapes import other_shape_inputs
from .sparsity.layers import MaskedLayer, iter_masked
from .unit import CompilationUnit, LiteralRewrite, ModuleRewrite, TensorRewrite

NATIVE_RTOL = 1e-5


@dataclass
class NativeBuild:
    """`build_native`'s answer: the model with the rewrites applied, or why it cannot be built."""

    module: Optional[nn.Module]
    reasons: List[str] = field(default_factory=list)   # why not native (empty when built)
    notes: List[str] = field(default_factory=list)     # what was done to get there


_get = submodule_or_none


def _holds(found: nn.Module, called: nn.Module) -> bool:
    """Is ``found`` (a module of the model) the one whose computation the graph called as ``called``?

    The same object (torch.fx), or a module owning the very parameters ``called`` computed with
    (torch.export; a functional call inside a module such as timm's BatchNormAct2d).
    """
    if found is called:
        return True
    theirs = list(called.parameters(recurse=False))
    if not theirs:
        return type(found) is type(called) and repr(found) == repr(called)
    mine = {id(p) for p in found.parameters(recurse=False)}
    return all(id(p) in mine for p in theirs)


_SIZE_ATTRIBUTES = ("in_features", "out_features", "in_channels", "out_channels", "groups", "num_features",
                    "num_channels", "normalized_shape", "embedding_dim")


def _resized_like(found: nn.Module, resized: nn.Module) -> nn.Module:
    """``found`` (same class, same forward code) holding the tensors and sizes of ``resized``.

    Sparse Wide rebuilds a norm, embedding or dense layer as its torch type at the new size; the
    model's own module may be a subclass with more in its forward (timm's BatchNormAct2d applies
    its activation, LayerNorm2d permutes): that forward must stay.
    """
    if type(found) is type(resized):
        return resized
    clone = copy.copy(found)
    clone._parameters, clone._buffers, clone._modules = dict(found._parameters), dict(found._buffers), \
        dict(found._modules)
    for name, tensor in list(resized._parameters.items()) + list(resized._buffers.items()):
        table = clone._parameters if name in clone._parameters else clone._buffers
        if name in table:
            table[name] = tensor
    for name in _SIZE_ATTRIBUTES:
        if name in vars(found) and hasattr(resized, name):
            setattr(clone, name, getattr(resized, name))
    return clone


def _structural(module: nn.Module) -> bool:
    """A module of sift's own (branches, factors, a masked layer): it replaces the model's module whole."""
    return isinstance(module, MaskedLayer) or getattr(type(module), "sift_rule", None) is not None


def _where(location: str) -> str:
    return f" at {location}" if location else ""


def _swap_modules(model: nn.Module, rewrites: Sequence[ModuleRewrite]) -> Tuple[List[str], List[str]]:
    """Put each rewritten module in the model; returns (reasons it could not, paths replaced)."""
    reasons, replaced = [], []
    for rewrite in rewrites:
        path, found = next(((p, m) for p, m in ((p, _get(model, p)) for p in dict.fromkeys(
            (rewrite.path, rewrite.owner)) if p) if m is not None and _holds(m, rewrite.old)), (None, None))
        if found is None:
            reasons.append(f"layer {rewrite.path!r} is computed by a functional call on parameters"
                           f"{_where(rewrite.location)} that no module of the model owns: its rewrite has no module "
                           "to replace; make it a module (nn.Linear/nn.Conv/nn.LayerNorm) to get the native model")
            continue
        read = _reads_tensors_of(model, path, rewrite.new) if _structural(rewrite.new) else ""
        if read:
            reasons.append(f"{read}, a tensor of layer {path!r}, which {type(rewrite.new).__name__} replaces by a "
                           "module without one (the model would fail when it takes that path, e.g. in training): "
                           f"keep those layers dense (--keep-dense '*.{path.rpartition('.')[2]}') to get the native model")
            continue
        model.set_submodule(path, rewrite.new if _structural(rewrite.new) else _resized_like(found, rewrite.new))
        replaced.append(path)
        if not _structural(rewrite.new) and list(rewrite.old.parameters(recurse=False)):
            replaced.extend(_swap_tied(model, path, found, rewrite))
    return reasons, replaced


def _swap_tied(model: nn.Module, path: str, found: nn.Module, rewrite: ModuleRewrite) -> List[str]:
    """The other places of the same weight take the resized tensors too: the module at other paths
    (T5's ``shared`` is also ``encoder.embed_tokens``) and modules of its class holding the same
    parameters (BART's ``shared``, ``encoder.embed_tokens`` and ``decoder.embed_tokens``: one
    weight, three modules). The graph called only one of them."""
    swapped = _get(model, path)
    tied = []
    for other, module in list(model.named_modules(remove_duplicate=False)):
        if other == path or not other:
            continue
        if module is found:
            model.set_submodule(other, swapped)
        elif type(module) is type(found) and _holds(module, rewrite.old):
            model.set_submodule(other, _resized_like(module, rewrite.new))
        else:
            continue
        tied.append(other)
    return tied


def _reads_tensors_of(model: nn.Module, path: str, new: nn.Module) -> str:
    """Where the forward of the module holding ``path`` reads that layer's weight or bias itself
    (Mamba-2's mixer passes ``self.out_proj.weight`` to its fused training kernel) and ``new``,
    the module replacing it, has none: "" if nowhere."""
    parent_path, _, name = path.rpartition(".")
    parent = _get(model, parent_path) if parent_path else model
    if parent is None:
        return ""
    try:
        # its forward only: other methods (diffusers' fuse_projections) are not on the path
        forward = inspect.unwrap(type(parent).forward)
        lines, start = inspect.getsourcelines(forward)
        filename = inspect.getsourcefile(forward) or "?"
    except (OSError, TypeError):
        return ""
    pattern = re.compile(rf"self\.{re.escape(name)}\.(weight|bias)\b")
    for offset, line in enumerate(lines):
        found = pattern.search(line)
        if found and not hasattr(new, found.group(1)):
            where = "/".join(filename.split("/")[-3:])
            return f"{type(parent).__name__} reads {found.group(0)} at {where}:{start + offset}"
    return ""


def _swap_tensors(model: nn.Module, rewrites: Sequence[TensorRewrite]) -> List[str]:
    reasons = []
    for rewrite in rewrites:
        owner_path, _, name = rewrite.target.rpartition(".")
        owner = _get(model, owner_path) if owner_path else model
        if owner is None or getattr(owner, name, None) is not rewrite.old:
            reasons.append(f"tensor {rewrite.target!r} that Sparse Wide widens is not a parameter or buffer of the "
                           "model at that name (a constant the capture made): it cannot be replaced")
            continue
        if name in owner._parameters:
            owner._parameters[name] = rewrite.new if isinstance(rewrite.new, nn.Parameter) else \
                nn.Parameter(rewrite.new, requires_grad=rewrite.old.requires_grad)
        else:
            owner._buffers[name] = rewrite.new
    return reasons


def _attributes(module: nn.Module, value: Any) -> List[str]:
    """Names of the plain number attributes of ``module`` equal to ``value``."""
    names = []
    for name, current in vars(module).items():
        if name.startswith("_") or isinstance(current, bool) or not isinstance(current, (int, float)):
            continue
        if isinstance(value, float) or isinstance(current, float):
            if math.isclose(float(current), float(value), rel_tol=1e-6):
                names.append(name)
        elif current == value:
            names.append(name)
    return names


def _retarget_literals(model: nn.Module, literals: Sequence[LiteralRewrite]) -> Tuple[List[str], List[str]]:
    """Give module attributes the values Sparse Wide gave the graph's constants (module docstring, 3)."""
    planned: Dict[Tuple[int, str], Tuple[nn.Module, str, Any, LiteralRewrite]] = {}
    reasons = []
    for literal in literals:
        found = None
        for path in list(reversed(literal.owners)) + [""]:
            owner = _get(model, path) if path else model
            names = _attributes(owner, literal.old) if owner is not None else []
            if names:
                found = [(owner, path, name) for name in names]
                break
        if not found:
            reasons.append(f"the forward code{_where(literal.location)} uses the literal {literal.old!r}, which Sparse "
                           f"Wide changes to {literal.new!r} (node {literal.node}): read it from a module attribute "
                           "(e.g. self.n_embd) to get the native model")
            continue
        for owner, path, name in found:
            key = (id(owner), name)
            if key in planned and planned[key][2] != literal.new:
                other = planned[key][3]
                reasons.append(f"attribute {name!r} of {path or 'the model'} would need two values ({other.new!r} "
                               f"at {other.node}, {literal.new!r} at {literal.node})")
            planned[key] = (owner, name, literal.new, literal)
    if reasons:
        return reasons, []
    notes = []
    for owner, name, value, literal in planned.values():
        notes.append(f"{type(owner).__name__}.{name}: {getattr(owner, name)!r} -> {value!r}")
        setattr(owner, name, value)
    return [], notes


# a block's own record of its conv's channels (diffusers' Downsample2D: ``assert x.shape[1] == self.channels``)
_CHANNEL_ATTRIBUTES = {"channels": "in", "in_channels": "in", "out_channels": "out"}


def _sizes(module: nn.Module) -> Optional[Tuple[int, int]]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.in_channels, module.out_channels
    return None


def _follow_channel_attributes(model: nn.Module, rewrites: Sequence[ModuleRewrite]) -> List[str]:
    """The parent of a resized conv/linear keeps its ``channels``/``in_channels``/``out_channels``
    equal to that layer's sizes, where they were equal before and every such layer agrees on the
    new value (`check_native` then checks the result like any other native model)."""
    planned: Dict[Tuple[int, str], Any] = {}
    owners: Dict[int, Tuple[nn.Module, str]] = {}
    for rewrite in rewrites:
        old, new = _sizes(rewrite.old), _sizes(rewrite.new)
        parent_path = rewrite.path.rpartition(".")[0]
        parent = _get(model, parent_path) if parent_path else None
        if old is None or new is None or old == new or parent is None:
            continue
        for name, side in _CHANNEL_ATTRIBUTES.items():
            value = vars(parent).get(name)
            index = 0 if side == "in" else 1
            if isinstance(value, int) and not isinstance(value, bool) and value == old[index] != new[index]:
                key = (id(parent), name)
                planned[key] = new[index] if planned.get(key, new[index]) == new[index] else None
                owners[id(parent)] = (parent, parent_path)
    notes = []
    for (owner_id, name), value in planned.items():
        parent, path = owners[owner_id]
        if value is not None:
            notes.append(f"{type(parent).__name__}.{name}: {getattr(parent, name)!r} -> {value!r}")
            setattr(parent, name, value)
    return notes


def _restore_library_modules(model: nn.Module, originals: Dict[str, nn.Module], touched: Sequence[str]) -> List[str]:
    restored = []
    for path, original in originals.items():
        if any(t == path or t.startswith(path + ".") for t in touched):
            continue  # replaced in its explicit form (Conv1D as a Linear, attention with explicit projections)
        model.set_submodule(path, original)
        restored.append(path)
    return restored


def build_native(unit: CompilationUnit, model: nn.Module, originals: Dict[str, nn.Module]) -> NativeBuild:
    """Apply the unit's rewrite log to ``model`` (capture's private copy, changed in place).

    Returns the model, or the reasons it cannot express the rewrite (then ``model`` is half
    changed and must be dropped).
    """
    log = unit.rewrites
    reasons, replaced = _swap_modules(model, log.modules)
    reasons += _swap_tensors(model, log.tensors)
    literal_reasons, notes = _retarget_literals(model, log.literals)
    reasons += literal_reasons
    if reasons:
        return NativeBuild(None, reasons)
    _restore_library_modules(model, originals, replaced)
    notes += _follow_channel_attributes(model, log.modules)
    if notes:
        notes = ["module attributes follow the widened sizes: " + ", ".join(notes)]
    return NativeBuild(model, [], notes)


def relative_error(actual: Any, expected: Any) -> float:
    """max |a - b| / max |b| over all outputs (inf when shapes, counts, NaN/inf places or integer
    values differ): `compare.compare_to_reference`'s relative error."""
    return compare_to_reference(actual, expected).relative


def _eval_outputs(module: nn.Module, args, kwargs) -> List[torch.Tensor]:
    """Outputs in eval mode. A compiled model's weights are exactly zero off their masks, so the
    masked layers run as an engine runs them (no ``W * M`` product, no float copy of the masks:
    at 0.9 that is as much memory as the weights)."""
    masked = [layer for _, layer in iter_masked(module) if not layer.engine_managed]
    try:
        for layer in masked:
            layer.engine_managed = True
        with torch.no_grad(), eval_mode(module):
            return tensor_leaves(module(*args, **kwargs))
    finally:
        for layer in masked:
            layer.engine_managed = False


def _failure(error: BaseException) -> str:
    """`AssertionError at diffusers/models/downsampling.py:134: assert hidden_states.shape[1] == self.channels`:
    the error and the line of code that raised it (an assert on a size has no message)."""
    frames = traceback.extract_tb(error.__traceback__)
    where = ""
    if frames:
        frame = frames[-1]
        where = f" at {'/'.join(frame.filename.split('/')[-3:])}:{frame.lineno}" + (f": {frame.line}" if frame.line else "")
    message = first_line(error, 200)
    return f"{type(error).__name__}{where}" + (f": {message}" if message else "")


def check_native(native: nn.Module, graph: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any],
                 rtol: float = NATIVE_RTOL, second_size: bool = True) -> Tuple[Optional[str], List[str]]:
    """(why the native model is wrong, or None; notes): both forms in eval mode on the example
    inputs and, with ``second_size``, at one more sample (and half the positions of token ids)."""
    notes = []
    sizes = [("the example inputs", (args, kwargs))]
    if second_size:
        sizes.append(("a second input size", other_shape_inputs((args, kwargs), halve_length=True)))
    for label, (a, k) in sizes:
        try:
            # a GraphModule prints its generated code to stderr when it raises: not the user's business here
            with contextlib.redirect_stderr(io.StringIO()):
                expected = _eval_outputs(graph, a, k)
        except Exception as e:  # the graph form itself fixes this size: nothing to compare with there
            notes.append(f"native model not compared at {label}: the graph form does not run there "
                         f"({type(e).__name__}: {first_line(e, 120)})")
            continue
        try:
            actual = _eval_outputs(native, a, k)
        except Exception as e:
            return f"the native model fails on {label}: {_failure(e)}", notes
        error = relative_error(actual, expected)
        if not error <= rtol:
            return (f"the native model computes something else than the graph form on {label} (relative error "
                    f"{error:.3g} > {rtol:g})"), notes
    return None, notes
