"""Graph canonicalisation: functional weight ops -> `call_module` nodes of real modules.

After capture, every dense matmul with a parameter weight should be a `call_module` node of an
`nn.Linear`/`nn.ConvNd`, and norms/embeddings/dropout should be modules too, so that passes and
analyses see one form whichever capture produced the graph:

1. ``F.linear(x, self.w, self.b)`` (torch.fx) or ``aten.linear(x, w, b)`` (torch.export) with
   ``get_attr`` weights -> ``call_module`` of an `nn.Linear` that holds the same Parameters.
2. The same for conv1d/2d/3d, layer_norm, embedding, batch_norm and dropout (torch.export bakes
   the train/eval mode of dropout and batch_norm into the graph; modules make it switchable again).

3. In a model sift already compiled, a masked layer's ``linear(x, W * M, b)`` (torch.export
   traces into every module) -> ``call_module`` of that very masked layer, as torch.fx keeps it.

The new module is registered at the path of the module that made the call (from
``nn_module_stack``), so names stay the user's (``transformer.h.0.attn.c_attn``). Parameters are
shared, not copied: a tied weight (GPT-2's ``lm_head`` and ``wte``) stays tied.

`annotate_provenance` then marks the nodes computed inside sift's own modules (a module class
with a ``sift_rule``, e.g. `ParallelBranches`) with ``sift.origin``/``sift.rule``/``sift.role``,
as the rewrite passes do for the nodes they splice in: a compiled model captured again reads
as the graph its compilation produced (export forms and reports rely on it).
"""
from __future__ import annotations

import operator
from typing import Any, Dict, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..module_tools import submodule_or_none
from ..sparsity.layers import MaskedLayer

aten = torch.ops.aten


def _bind(node: fx.Node, names: Sequence[str], defaults: Dict[str, Any]) -> Dict[str, Any]:
    bound = dict(defaults)
    bound.update(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


_UNIT_DIM_VIEWS = frozenset({aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default,
                             torch.squeeze, torch.unsqueeze, "squeeze", "unsqueeze"})


def _param(gm: fx.GraphModule, arg: Any) -> Optional[torch.Tensor]:
    """The tensor behind a get_attr node (None for anything else). A chain of squeezes and
    unsqueezes that gives the parameter back in its own shape is the parameter (Mamba's
    ``conv1d(x, self.conv1d.weight.squeeze(1).unsqueeze(1))``): the same elements, no copy."""
    if not isinstance(arg, fx.Node):
        return None
    end = arg
    while arg.op in ("call_function", "call_method") and arg.target in _UNIT_DIM_VIEWS \
            and isinstance(arg.args[0], fx.Node):
        arg = arg.args[0]
    if arg.op == "get_attr":
        value = operator.attrgetter(str(arg.target))(gm)
        if not isinstance(value, torch.Tensor):
            return None
        shape = end.meta.get("val").shape if isinstance(end.meta.get("val"), torch.Tensor) else value.shape
        return value if tuple(shape) == tuple(value.shape) else None
    return None


def _as_param(t: Optional[torch.Tensor]) -> Optional[nn.Parameter]:
    if t is None or isinstance(t, nn.Parameter):
        return t
    return nn.Parameter(t, requires_grad=False)


def _install(module: nn.Module, **params: Optional[torch.Tensor]) -> nn.Module:
    """Put the graph's own tensors into a module built on the meta device (no copy, no init)."""
    for name, value in params.items():
        if name in ("running_mean", "running_var"):
            module._buffers[name] = value
        elif value is None:
            module._parameters[name] = None
        else:
            module._parameters[name] = _as_param(value)
    for name, buf in list(module._buffers.items()):
        if buf is not None and buf.is_meta:  # e.g. BatchNorm's num_batches_tracked
            module._buffers[name] = torch.zeros(buf.shape, dtype=buf.dtype)
    return module


def _linear(gm, node, b):
    w = _param(gm, b["weight"])
    if w is None or w.dim() != 2:
        return None
    bias = _param(gm, b.get("bias"))
    if b.get("bias") is not None and bias is None:
        return None
    m = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
    return _install(m, weight=w, bias=bias), [b["input"]]


def _conv(dims):
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]

    def build(gm, node, b):
        w = _param(gm, b["weight"])
        bias = _param(gm, b.get("bias"))
        if w is None or (b.get("bias") is not None and bias is None) or w.dim() != dims + 2:
            return None
        def as_arg(value):
            return tuple(value) if isinstance(value, list) else value
        m = cls(w.shape[1] * b.get("groups", 1), w.shape[0], tuple(w.shape[2:]), stride=as_arg(b.get("stride", 1)),
                padding=as_arg(b.get("padding", 0)), dilation=as_arg(b.get("dilation", 1)),
                groups=b.get("groups", 1), bias=bias is not None, device="meta")
        return _install(m, weight=w, bias=bias), [b["input"]]
    build.weight_op = True
    return build


def _layer_norm(gm, node, b):
    w, bias = _param(gm, b.get("weight")), _param(gm, b.get("bias"))
    if (b.get("weight") is not None and w is None) or (b.get("bias") is not None and bias is None):
        return None
    m = nn.LayerNorm(list(b["normalized_shape"]), eps=b.get("eps", 1e-5),
                     elementwise_affine=w is not None, bias=bias is not None, device="meta")
    if w is not None:
        _install(m, weight=w, bias=bias)
    return m, [b["input"]]


def _embedding(gm, node, b):
    w = _param(gm, b["weight"])
    if w is None or b.get("max_norm") is not None:
        return None
    padding_idx = b.get("padding_idx", None)
    padding_idx = None if padding_idx is None or padding_idx < 0 else padding_idx
    m = nn.Embedding(w.shape[0], w.shape[1], padding_idx=padding_idx, device="meta")
    return _install(m, weight=w), [b["input"]]


def _batch_norm(gm, node, b):
    mean, var = _param(gm, b.get("running_mean")), _param(gm, b.get("running_var"))
    w, bias = _param(gm, b.get("weight")), _param(gm, b.get("bias"))
    if mean is None or var is None:
        return None
    m = _BATCH_NORMS.get(_rank(node.args[0]), nn.BatchNorm2d)(
        mean.shape[0], eps=b.get("eps", 1e-5), momentum=b.get("momentum", 0.1), affine=w is not None, device="meta")
    _install(m, weight=w, bias=bias, running_mean=mean, running_var=var)
    m.train(bool(b.get("training", False)))
    return m, [b["input"]]


def _dropout(gm, node, b):
    m = nn.Dropout(b.get("p", 0.5))
    m.train(bool(b.get("train", b.get("training", True))))
    return m, [b["input"]]


_BATCH_NORMS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _rank(arg: Any) -> int:
    val = arg.meta.get("val") if isinstance(arg, fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else 4


_CONV_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
# target -> (argument names in order, defaults, builder, suffix for the module name if needed)
RULES: Dict[Any, tuple] = {
    F.linear: (("input", "weight", "bias"), {}, _linear),
    aten.linear.default: (("input", "weight", "bias"), {}, _linear),
    F.conv1d: (_CONV_NAMES, {}, _conv(1)), F.conv2d: (_CONV_NAMES, {}, _conv(2)), F.conv3d: (_CONV_NAMES, {}, _conv(3)),
    aten.conv1d.default: (_CONV_NAMES, {}, _conv(1)), aten.conv2d.default: (_CONV_NAMES, {}, _conv(2)),
    aten.conv3d.default: (_CONV_NAMES, {}, _conv(3)), aten.conv1d.padding: (_CONV_NAMES, {}, _conv(1)),
    aten.conv2d.padding: (_CONV_NAMES, {}, _conv(2)), aten.conv3d.padding: (_CONV_NAMES, {}, _conv(3)),
    F.layer_norm: (("input", "normalized_shape", "weight", "bias", "eps"), {}, _layer_norm),
    aten.layer_norm.default: (("input", "normalized_shape", "weight", "bias", "eps"), {}, _layer_norm),
    F.embedding: (("input", "weight", "padding_idx", "max_norm"), {}, _embedding),
    aten.embedding.default: (("weight", "input", "padding_idx"), {}, _embedding),
    aten.batch_norm.default: (("input", "weight", "bias", "running_mean", "running_var", "training",
                               "momentum", "eps"), {}, _batch_norm),
    aten._native_batch_norm_legit_no_training.default: (
        ("input", "weight", "bias", "running_mean", "running_var", "momentum", "eps"), {"training": False},
        _batch_norm),
    aten.dropout.default: (("input", "p", "train"), {}, _dropout),
    F.batch_norm: (("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
                   {}, _batch_norm),
    F.dropout: (("input", "p", "training"), {"p": 0.5, "training": True}, _dropout),
}


_WEIGHT_OPS = frozenset(t for t, rule in RULES.items() if rule[2] is _linear or getattr(rule[2], "weight_op", False))


def _owner_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return path or "sift_fn"
    return "sift_fn"


def _free_path(gm: fx.GraphModule, path: str, module: nn.Module, made: Dict[str, nn.Module]) -> str:
    """`path` if nothing real lives there yet, else `path.op`, `path.op_1`, ..."""
    candidates = [path] + [f"{path}.{type(module).__name__.lower()}" + (f"_{i}" if i else "") for i in range(100)]
    for candidate in candidates:
        existing = submodule_or_none(gm, candidate)
        if existing is None:
            return candidate
        if candidate in made:
            continue
        # torch.export leaves plain nn.Module holders for parameters; one holding only this op's
        # tensors can be replaced by the real module.
        if type(existing) is nn.Module and not list(existing.children()):
            own = {id(t) for t in list(existing.parameters(recurse=False)) + list(existing.buffers(recurse=False))}
            new = {id(t) for t in list(module.parameters()) + list(module.buffers())}
            if own <= new:
                return candidate
    raise RuntimeError(f"no free module name near {path!r}")


def _same_module(a: nn.Module, b: nn.Module) -> bool:
    if type(a) is not type(b) or repr(a) != repr(b) or a.training != b.training:
        return False
    pa = list(a.parameters()) + list(a.buffers())
    pb = list(b.parameters()) + list(b.buffers())
    return len(pa) == len(pb) and all(x is y for x, y in zip(pa, pb))


def _erase_unused_views(gm: fx.GraphModule, args: Sequence[Any]) -> None:
    """The squeezes `_param` looked through, now that nothing reads them."""
    for arg in args:
        while isinstance(arg, fx.Node) and not arg.users and arg.target in _UNIT_DIM_VIEWS \
                and arg.op in ("call_function", "call_method"):
            source = arg.args[0]
            gm.graph.erase_node(arg)
            arg = source


def _has_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _innermost_owner(node: fx.Node) -> Optional[str]:
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else None


_submodule = submodule_or_none


def _restore_masked_layers(gm: fx.GraphModule, model: Optional[nn.Module]) -> int:
    """``linear/conv(x, W * M, b)`` traced inside a masked layer -> ``call_module`` of that layer."""
    changed = 0
    restored = set()
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _WEIGHT_OPS:
            continue
        path = _innermost_owner(node)
        layer = _submodule(model, path)
        if not isinstance(layer, MaskedLayer):
            continue
        names, defaults, _ = RULES[node.target]
        gm.add_submodule(path, layer)  # replaces torch.export's holder of the layer's tensors
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(path, (_bind(node, names, defaults)["input"],))
        new.meta.update({k: v for k, v in node.meta.items() if k in ("stack_trace", "nn_module_stack", "val")})
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        restored.add(path)
        changed += 1
    if changed:
        # what remains of the layers' own forward (W * M, the mask's dtype cast and torch.export's
        # assertions on it, which dead-code elimination keeps) goes too
        for node in reversed(list(gm.graph.nodes)):
            if not node.users and node.op == "call_function" and _innermost_owner(node) in restored:
                gm.graph.erase_node(node)
        gm.graph.eliminate_dead_code()
    return changed


def modularize_functional_ops(gm: fx.GraphModule, model: Optional[nn.Module] = None) -> int:
    """Turn functional weight/norm/embedding/dropout calls into `call_module` nodes (in place).

    ``model``: the module ``gm`` was captured from, where masked layers are looked up.
    """
    made: Dict[str, nn.Module] = {}
    owners: Dict[str, str] = {}
    changed = _restore_masked_layers(gm, model)
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in RULES:
            continue
        names, defaults, build = RULES[node.target]
        built = build(gm, node, _bind(node, names, defaults))
        if built is None:
            continue
        module, inputs = built
        owner = _owner_path(node)
        # a shared layer: the same tensors, or, for a module without any (a LayerNorm without
        # affine, dropout), the same module of the model called again
        path = next((p for p, m in made.items() if _same_module(m, module)
                     and (_has_tensors(m) or owners[p] == owner)), None)
        if path is None:
            path = _free_path(gm, owner, module, made)
            gm.add_submodule(path, module)
            made[path], owners[path] = module, owner
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(path, tuple(inputs))
        new.meta.update({k: v for k, v in node.meta.items() if k in ("stack_trace", "nn_module_stack", "val")})
        node.replace_all_uses_with(new)
        read = node.all_input_nodes
        gm.graph.erase_node(node)
        _erase_unused_views(gm, read)
        changed += 1
    if changed:
        for node in list(gm.graph.nodes):
            if node.op == "get_attr" and not node.users:
                gm.graph.erase_node(node)
        gm.graph.lint()
        gm.recompile()
    return changed


def annotate_provenance(gm: fx.GraphModule, model: nn.Module) -> int:
    """Mark nodes computed inside sift's rewrite modules with their origin, rule and role."""
    marked = 0
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method") or "sift.origin" in node.meta:
            continue
        stack = node.meta.get("nn_module_stack") or {}
        for path, _ in stack.values():
            rule = getattr(type(_submodule(model, path)), "sift_rule", None)
            if rule:
                node.meta["sift.origin"], node.meta["sift.rule"] = path, rule
                if node.op == "call_module" and str(node.target).startswith(path + "."):
                    node.meta["sift.role"] = str(node.target)[len(path) + 1:]
                marked += 1
                break
    return marked
