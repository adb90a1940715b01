"""Capture: any `nn.Module` -> a canonical `torch.fx.GraphModule`.

``capture(model, args, kwargs)`` works on a deep copy (the user's model is never changed):

1. canonicalise library modules that hide matmuls (`capture.modules`); a Hugging Face model is
   traced with its copy's ``config.use_cache`` off (a KV cache is an output the graph cannot
   hold); the copy gets the user's setting back afterwards;
2. trace with torch.fx, treating child-less `torch.nn` modules and masked layers as leaves;
   models fx cannot trace (transformers 5.x, data-dependent Python control flow) go through
   ``torch.export`` with dynamic batch and sequence dims instead;
3. turn functional weight ops into module calls, masked layers of an already compiled model
   included, and mark the nodes of sift's own modules with their origin (`capture.normalize`);
4. check the captured graph computes what the model computes on the example inputs.

The private copy the graph was traced from is returned too (``CaptureResult.model``): its leaf
modules are the graph's own, which is where `native` builds the user's model back from.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import re
import traceback
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

from ..compare import compare_to_reference, tensor_leaves
from ..config import attach_config, config_of
from ..errors import CaptureError, UserInputError, first_line
from ..sparsity.layers import MaskedLayer
from .experts import EXPERTS_KEPT_FUSED, annotate_routing
from ..module_tools import eval_mode, follow_training_flags
from .modules import canonicalize_modules, is_transformers_model, on_meta_device
from .normalize import annotate_provenance, modularize_functional_ops

log = logging.getLogger(__name__)


class SiftTracer(fx.Tracer):
    """fx tracer whose leaves are the primitive layers: child-less `torch.nn` modules and masked layers."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, MaskedLayer):
            return True
        if getattr(type(m), "_sift_leaf", False):
            return True
        return type(m).__module__.startswith("torch.nn") and not any(True for _ in m.children())


def symbolic_trace(module: nn.Module, concrete_args: Optional[Dict[str, Any]] = None) -> fx.GraphModule:
    """Trace ``module`` with `SiftTracer`; the GraphModule shares the module's parameters."""
    tracer = SiftTracer()
    tracer.record_stack_traces = True  # errors and notes name the user's source line
    graph = tracer.trace(module, concrete_args=concrete_args)
    name = module.__class__.__name__ if isinstance(module, nn.Module) else module.__name__
    return fx.GraphModule(tracer.root, graph, name)


@dataclass
class CaptureResult:
    """The captured graph, how it was captured, and the private model copy it was traced from."""

    module: fx.GraphModule
    method: str  # "fx" or "export"
    fx_error: Optional[str] = None
    model: Optional[nn.Module] = None       # the canonicalised copy; its leaf modules (fx) or tensors are the graph's
    canonicalized: Dict[str, nn.Module] = field(default_factory=dict)  # path -> library module it replaced
    kwargs: Dict[str, Any] = field(default_factory=dict)  # the keyword inputs it was captured with
    notes: List[str] = field(default_factory=list)


@contextlib.contextmanager
def _kv_cache_off(model: nn.Module) -> Iterator[Optional[str]]:
    """Trace a Hugging Face model without its KV cache; yields a note when it switched it off."""
    if not is_transformers_model(model):
        yield None
        return
    # An encoder-decoder's stacks hold configs of their own (T5's decoder: a deep copy with use_cache on)
    configs = {id(c): c for c in (getattr(m, "config", None) for m in model.modules())
               if getattr(c, "use_cache", False) is True}
    if not configs:
        yield None
        return
    for config in configs.values():
        config.use_cache = False
    try:
        yield "captured without the KV cache (the graph form has no use_cache); config.use_cache is left as it was"
    finally:
        for config in configs.values():
            config.use_cache = True


def _fx_capture(model: nn.Module, kwargs: Dict[str, Any]) -> fx.GraphModule:
    # Unused keyword arguments with defaults become constants, so forward(x, mask=None) traces.
    concrete = {}
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    for name, p in params.items():
        if name not in kwargs and p.default is not inspect.Parameter.empty and p.kind not in (
                p.VAR_POSITIONAL, p.VAR_KEYWORD):
            concrete[name] = p.default
    # Traced in eval mode: Python branches on self.training are frozen by tracing, and the eval
    # path is the one the captured graph must reproduce exactly. Functional batch_norm/dropout
    # become modules in normalize, so train()/eval() still switch them afterwards.
    with eval_mode(model):
        gm = symbolic_trace(model, concrete_args=concrete or None)
    follow_training_flags(gm, model)  # the graph's root and the containers it made for dotted paths
    _drop_concrete_arg_guards(gm)
    return gm


def _drop_concrete_arg_guards(gm: fx.GraphModule) -> None:
    """symbolic_trace guards each concrete argument (``assert is_causal == False``); the guards
    compare Python values to placeholders, which the TorchScript ONNX exporter cannot trace."""
    from torch.fx._symbolic_trace import _assert_is_none
    placeholders = {n for n in gm.graph.nodes if n.op == "placeholder"}
    guards = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (torch._assert, _assert_is_none)
              and any(a in placeholders or any(b in placeholders for b in a.all_input_nodes)
                      for a in n.all_input_nodes)]
    for guard in guards:
        inputs = guard.all_input_nodes
        gm.graph.erase_node(guard)
        for node in inputs:
            if node.op == "call_function" and not node.users:
                gm.graph.erase_node(node)
    if guards:
        gm.recompile()


def _batch_of_two(args: Tuple[Any, ...], kwargs: Dict[str, Any]):
    """torch.export specialises dims of size 1; a batch of 2 keeps the batch dim dynamic."""
    def grow(x):
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == 1:
            return torch.cat([x, x], 0)
        return x
    return pytree.tree_map(grow, args), pytree.tree_map(grow, kwargs)


def _export_capture(model: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> fx.GraphModule:
    args2, kwargs2 = _batch_of_two(args, kwargs)
    auto = torch.export.Dim.AUTO

    def dims(x):
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            # batch always; the sequence dim of token ids too
            return {0: auto, 1: auto} if (x.dim() == 2 and not x.is_floating_point()) else {0: auto}
        return None
    dynamic = (pytree.tree_map(dims, args2), pytree.tree_map(dims, kwargs2))
    dynamic_shapes = {**dict(zip(_positional_names(model, len(args2)), dynamic[0])), **dynamic[1]}
    # Exported in eval mode: torch.export bakes train-time constants (e.g. the attention dropout_p
    # handed to scaled_dot_product_attention) into the graph. Dropout and BatchNorm become modules
    # again in normalize, so train()/eval() still switch them afterwards.
    with eval_mode(model):
        program = torch.export.export(model, args2, kwargs2, dynamic_shapes=dynamic_shapes, strict=False)
    exported = program.module()
    # A plain GraphModule: exported modules refuse train()/eval().
    gm = fx.GraphModule(exported, exported.graph, type(model).__name__)
    follow_training_flags(gm, model)
    _unslice_module_paths(gm)
    return gm


_SLICED = re.compile(r"\.slice\((None|\d+), (None|-?\d+), (None|\d+)\)\.(\d+)(?=\.|$)")


def _unslice_module_paths(gm: fx.GraphModule) -> None:
    """torch.export names a module reached through a sliced ModuleList (``self.layers[:n]``, Mixtral,
    Qwen3-MoE) ``layers.slice(None, 2, None).0``; the model's own path is ``layers.0``."""
    def unslice(path: str) -> str:
        def index(match) -> str:
            start, step = int(match[1] if match[1] != "None" else 0), int(match[3] if match[3] != "None" else 1)
            return f".{start + step * int(match[4])}"
        return _SLICED.sub(index, path)
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {key: (unslice(path), cls) for key, (path, cls) in stack.items()}


def _positional_names(model: nn.Module, count: int):
    names = [n for n, p in inspect.signature(model.forward).parameters.items()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return names[:count]


def _user_frame(exc: BaseException) -> str:
    """'file:line' of the innermost frame outside torch, where fx tracing gave up."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        if "/torch/" not in frame.filename and "sift_compiler" not in frame.filename:
            return f"{frame.filename}:{frame.lineno} in {frame.name}"
    return "unknown location"


def capture(model: nn.Module, args: Tuple[Any, ...] = (), kwargs: Optional[Dict[str, Any]] = None,
            method: str = "auto", verify: bool = True, copy_model: bool = True) -> CaptureResult:
    """Capture ``model`` as a canonical GraphModule (see the module docstring).

    >>> result = capture(torchvision.models.resnet18(), (torch.randn(1, 3, 224, 224),))
    >>> result.module.graph  # conv1, bn1, relu, ... as call_module nodes

    ``copy_model=False`` traces ``model`` itself (no copy of its weights; the graph shares them)
    and puts back whatever canonicalisation changed: for reading a model, not for rewriting it.
    """
    if method not in ("auto", "fx", "export"):
        raise ValueError(f"unknown capture method {method!r}: use 'auto', 'fx' or 'export'")
    kwargs = dict(kwargs or {})
    meta = on_meta_device(model)
    verify = verify and not meta  # no values to compare on the meta device
    reference = reference_outputs(model, args, kwargs) if verify else None
    original = model
    model = copy.deepcopy(model) if copy_model else model
    flags = [] if copy_model else [(m, m.training) for m in model.modules()]  # the graph shares them
    refusals: List[str] = []
    canonicalized = canonicalize_modules(model, refusals)
    try:
        with _kv_cache_off(model) as note:
            gm, used, fx_error = _trace(model, args, kwargs, method)
        modularize_functional_ops(gm, model)
        annotate_provenance(gm, model)
        annotate_routing(gm, model)
        follow_training_flags(gm, model)  # modules made from baked train/eval flags follow the model's
        if verify:
            check_capture(gm, args, kwargs, reference, type(original).__name__)
    finally:
        if not copy_model:
            for path, module in canonicalized.items():
                model.set_submodule(path, module)
            for module, flag in flags:
                module.training = flag
    notes = ([note] if note else []) + [f"{EXPERTS_KEPT_FUSED}: {why}" for why in refusals]
    if meta:
        notes.append("meta device: the captured graph was not checked against the model's outputs (no values)")
    return CaptureResult(gm, used, fx_error, model if copy_model else None, canonicalized if copy_model else {},
                         kwargs, notes)


def _compiled(module: nn.Module) -> bool:
    return config_of(module) is not None or any(
        isinstance(m, MaskedLayer) or getattr(type(m), "sift_rule", None) for m in module.modules())


def graph_of(module: nn.Module, args: Tuple[Any, ...] = (), kwargs: Optional[Dict[str, Any]] = None) -> nn.Module:
    """The graph form of a compiled ``module``: itself if it is a GraphModule, else captured without a copy.
    A model sift did not compile comes back as it is.

    A model compiled to its native form reads back as its compiled graph: masked layers stay
    modules and the nodes of sift's own modules carry their origin (`capture.normalize`).
    """
    if isinstance(module, fx.GraphModule) or not _compiled(module):
        return module  # a plain model has nothing of sift's to find
    gm = capture(module, args, kwargs, verify=False, copy_model=False).module
    if config_of(module) is not None:
        attach_config(gm, config_of(module))
    return gm


def _trace(model: nn.Module, args, kwargs, method: str) -> Tuple[fx.GraphModule, str, Optional[str]]:
    """(graph, "fx" or "export", why fx failed): torch.fx first unless the model needs torch.export."""
    fx_error = None
    gm = None
    if method == "fx" or (method == "auto" and not is_transformers_model(model)):
        try:
            gm = _fx_capture(model, kwargs)
            used = "fx"
        except Exception as e:  # fx raises many types; all mean "try export"
            fx_error = f"{type(e).__name__}: {e} (at {_user_frame(e)})"
            if method == "fx":
                raise CaptureError(f"torch.fx cannot trace {type(model).__name__}: {fx_error}. "
                                   "Try capture method 'export'.") from e
            log.info("torch.fx failed (%s); trying torch.export", fx_error)
    if gm is None:
        try:
            gm = _export_capture(model, args, kwargs)
            used = "export"
        except Exception as e:
            detail = f"torch.fx: {fx_error}; torch.export: {type(e).__name__}: {first_line(e)}"
            raise CaptureError(
                f"cannot capture {type(model).__name__} as a graph ({detail}). Make the failing forward "
                "code traceable (no Python control flow on tensor values), or mark the module as a leaf "
                "with `sift_compiler.capture.leaf_module`.") from e
    return gm, used, fx_error


def leaf_module(cls: type) -> type:
    """Class decorator: keep modules of this type opaque (one `call_module` node) during capture."""
    cls._sift_leaf = True
    return cls


def _describe_inputs(args, kwargs) -> str:
    leaves = tensor_leaves((args, kwargs))
    return ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in leaves)


def reference_outputs(model: nn.Module, args, kwargs):
    """The model's own outputs in eval mode; a model that rejects the inputs is a user error."""
    try:
        with torch.no_grad(), eval_mode(model):
            return [t.clone() for t in tensor_leaves(model(*args, **kwargs))]
    except Exception as e:
        first = first_line(e)
        raise UserInputError(f"{type(model).__name__} rejects the example input ({_describe_inputs(args, kwargs)}): "
                             f"{type(e).__name__}: {first}. Pass an input shape/dtype the model accepts "
                             "(--input-shape, --input-dtype).") from e


def check_capture(gm: fx.GraphModule, args, kwargs, expected, model_name: str,
                  rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Raise CaptureError unless ``gm`` reproduces the model's ``expected`` outputs (every entry
    within ``atol + rtol |expected|``, `compare.compare_to_reference`)."""
    try:
        with torch.no_grad(), eval_mode(gm):
            actual = tensor_leaves(gm(*args, **kwargs))
    except Exception as e:
        raise CaptureError(f"the captured graph of {model_name} does not run on the example inputs: "
                           f"{type(e).__name__}: {e}") from e
    comparison = compare_to_reference(actual, expected, rtol=rtol, atol=atol)
    if not comparison.close:
        what = comparison.mismatch or \
            f"outputs differ by up to {comparison.max_abs:.3g} (output scale {comparison.scale:.3g})"
        raise CaptureError(f"the captured graph of {model_name} does not reproduce the model's outputs: {what}; "
                           "the model may depend on state that tracing froze. Please report it with the model.")
