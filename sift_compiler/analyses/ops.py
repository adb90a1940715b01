"""The op table: for every op a graph can call, its kind, its coupling rule and its FLOP rule.

Rows are keyed by the target itself, whichever capture produced the graph: module types (matched
along the MRO, so masked layers are Linear/Conv), torch and ``torch.nn.functional`` functions,
``operator.*``, Tensor method names (a `call_method` node's target is a string) and ATen overload
packets (`torch.export` graphs). Each row says:

- ``kind``: a short canonical name ("linear", "add", "view"...) that analyses key on;
- ``coupling``: how the op's output axes follow its inputs' (`coupling_rules`, `coupling_views`).
  None: no rule, so every channel group it touches keeps its width, and the report says which op;
- ``flops``: its cost (`flop_rules`); `FREE` for views, copies and lookups on purpose. None: not
  counted, and listed in the report's ``uncounted``.

Adding an op is one row. ``lookup(gm, node)`` finds a node's row (None when the op is unknown).
"""
from __future__ import annotations

import builtins
import operator
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import coupling_rules as C
from . import coupling_views as V
from . import flop_rules as R

aten = torch.ops.aten


@dataclass(frozen=True)
class OpSpec:
    kind: str
    coupling: Optional[C.CouplingRule]
    flops: Optional[R.FlopRule]


def named(*names: str) -> List[Any]:
    """Every target called ``name`` (and its in-place ``name_``): the torch and functional
    functions, the Tensor method name and the ATen packet, those that exist."""
    found: List[Any] = []
    for name in names:
        for variant in (name, name + "_"):
            for space in (torch, F):
                target = getattr(space, variant, None)
                if callable(target) and not isinstance(target, type) and target not in found:
                    found.append(target)
            if hasattr(torch.Tensor, variant):
                found.append(variant)
            try:
                found.append(getattr(aten, variant))
            except (AttributeError, RuntimeError):
                pass
    return found


_ELEMENTWISE = ("add", "sub", "rsub", "mul", "div", "true_divide", "remainder", "fmod", "neg", "pow", "sqrt",
                "rsqrt", "exp", "exp2", "expm1", "log", "log1p", "log2", "abs", "sigmoid", "tanh", "hardsigmoid",
                "hardtanh", "softplus", "softsign", "selu", "celu", "clamp", "clamp_min", "clamp_max", "clip",
                "erf", "erfc", "sign", "round", "floor", "ceil", "trunc", "reciprocal", "square", "cos", "sin",
                "tan", "atan", "where", "masked_fill", "lerp", "maximum", "minimum", "addcmul", "addcdiv")
_ACTIVATIONS = ("relu", "relu6", "gelu", "silu", "hardswish", "mish", "leaky_relu", "elu")
_COPIES = ("to", "_to_copy", "float", "half", "bfloat16", "double", "type", "type_as", "contiguous", "clone",
           "detach", "alias", "copy", "dropout", "alpha_dropout", "feature_alpha_dropout", "dropout1d",
           "dropout2d", "dropout3d", "tril", "triu", "cumsum")
_COMPARE = ("eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_xor", "logical_not",
            "bitwise_and", "bitwise_or", "bitwise_not", "isnan", "isinf", "isfinite", "__and__", "__or__")
_REDUCTIONS = ("mean", "sum", "amax", "amin", "prod", "std", "var", "logsumexp", "all", "any", "nansum",
               "nanmean", "argmax", "argmin")
_CREATE = ("arange", "randint", "scalar_tensor", "tensor", "lift_fresh_copy", "linspace", "eye")
_LIKE = ("zeros_like", "ones_like", "full_like", "empty_like", "rand_like", "randn_like")
_POOLS = ("max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices", "avg_pool1d", "avg_pool2d",
          "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
          "_adaptive_avg_pool2d", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d")
_NO_RULE_COPIES = ("tile", "roll", "flip", "gather", "index_select",
                   "movedim", "diff", "scatter", "masked_select", "take_along_dim")



def _pool_kind(name: str) -> str:
    return ("adaptive_" if "adaptive" in name else "") + ("max_pool" if "max" in name else "avg_pool")


# (kind, coupling rule, FLOP rule, targets)
ROWS = [
    # weight layers
    ("linear", C.linear_module, R.weight_module, [nn.Linear]),
    ("conv_transpose", None, R.weight_module, [nn.modules.conv._ConvTransposeNd]),
    ("conv", C.conv_module, R.weight_module, [nn.modules.conv._ConvNd]),
    ("embedding", C.embedding_module, R.FREE_EMBEDDING, [nn.Embedding]),
    ("embedding", None, R.embedding_bag, [nn.EmbeddingBag]),  # a weight layer; its bags have no coupling rule
    ("linear", C.functional_linear, R.functional_linear, named("linear")),
    ("conv", None, R.functional_conv, named("conv1d", "conv2d", "conv3d", "convolution")),
    ("embedding", C.functional_embedding, R.FREE_EMBEDDING, [F.embedding]),
    ("embedding", C.aten_embedding, R.FREE_EMBEDDING, [torch.embedding, aten.embedding]),
    # norms
    ("batch_norm", C.batch_norm_module, R.BATCH_NORM, [nn.modules.batchnorm._BatchNorm]),
    ("instance_norm", C.batch_norm_module, R.NORM, [nn.modules.instancenorm._InstanceNorm]),
    ("group_norm", C.group_norm_module, R.NORM, [nn.GroupNorm]),
    ("layer_norm", C.layer_norm_module, R.NORM, [nn.LayerNorm]),
    ("rms_norm", C.layer_norm_module, R.NORM, [nn.RMSNorm] if hasattr(nn, "RMSNorm") else []),
    ("batch_norm", C.channel_norm, R.BATCH_NORM,
     named("batch_norm", "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training")),
    ("instance_norm", C.channel_norm, R.NORM, named("instance_norm")),
    ("group_norm", C.channel_norm, R.NORM, named("group_norm", "native_group_norm")),
    ("layer_norm", C.last_dims_norm, R.NORM, named("layer_norm", "native_layer_norm")),
    ("rms_norm", C.last_dims_norm, R.NORM, named("rms_norm")),
    ("normalize", C.passthrough, R.SOFTMAX, [F.normalize]),
    # matmuls and attention
    ("matmul", C.matmul, R.matmul, named("matmul", "mm", "bmm") + [operator.matmul]),
    ("matmul", C.addmm, R.addmm, named("addmm", "baddbmm")),
    ("einsum", C.einsum, R.einsum, named("einsum")),
    ("sdpa", C.sdpa, R.sdpa, named("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
                                   "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention")),
    ("softmax", C.passthrough, R.SOFTMAX, named("softmax", "_softmax", "log_softmax", "_log_softmax")
     + [nn.Softmax, nn.LogSoftmax]),
    # element-wise
    *[(name, C.broadcast, R.ELEMENTWISE, named(name)) for name in _ELEMENTWISE + _ACTIVATIONS],
    ("add", C.broadcast, R.ELEMENTWISE, [operator.add, operator.iadd]),
    ("sub", C.broadcast, R.ELEMENTWISE, [operator.sub, operator.isub]),
    ("mul", C.broadcast, R.ELEMENTWISE, [operator.mul, operator.imul]),
    ("div", C.broadcast, R.ELEMENTWISE, [operator.truediv, operator.itruediv]),
    ("floordiv", C.broadcast, R.ELEMENTWISE, named("floor_divide") + [operator.floordiv, operator.ifloordiv]),
    ("remainder", C.broadcast, R.ELEMENTWISE, [operator.mod]),
    ("pow", C.broadcast, R.ELEMENTWISE, [operator.pow, operator.ipow]),
    ("neg", C.broadcast, R.ELEMENTWISE, [operator.neg]),
    ("compare", C.broadcast, R.ELEMENTWISE, named(*_COMPARE) + [operator.eq, operator.ne, operator.lt, operator.le,
                                                                 operator.gt, operator.ge, operator.and_,
                                                                 operator.or_, operator.xor, operator.invert]),
    ("relu", C.passthrough, R.ELEMENTWISE, [nn.ReLU]), ("relu6", C.passthrough, R.ELEMENTWISE, [nn.ReLU6]),
    ("gelu", C.passthrough, R.ELEMENTWISE, [nn.GELU]), ("silu", C.passthrough, R.ELEMENTWISE, [nn.SiLU]),
    ("hardswish", C.passthrough, R.ELEMENTWISE, [nn.Hardswish]), ("mish", C.passthrough, R.ELEMENTWISE, [nn.Mish]),
    ("hardsigmoid", C.passthrough, R.ELEMENTWISE, [nn.Hardsigmoid]),
    ("sigmoid", C.passthrough, R.ELEMENTWISE, [nn.Sigmoid]), ("tanh", C.passthrough, R.ELEMENTWISE, [nn.Tanh]),
    ("leaky_relu", C.passthrough, R.ELEMENTWISE, [nn.LeakyReLU]), ("elu", C.passthrough, R.ELEMENTWISE, [nn.ELU]),
    ("relu6", C.passthrough, R.ELEMENTWISE, [nn.Hardtanh]), ("gelu", C.passthrough, R.ELEMENTWISE, [nn.GELU]),
    ("prelu", None, R.ELEMENTWISE, [nn.PReLU] + named("prelu")),
    # copies and dropout: shape-preserving, free
    ("dropout", C.passthrough, R.FREE, [nn.Dropout, nn.modules.dropout._DropoutNd]),
    ("identity", C.passthrough, R.FREE, [nn.Identity]),
    ("identity", C.copy_into, R.FREE, named("copy")),  # before the copies: dst.copy_(src) couples src to dst
    *[("identity" if name not in ("dropout", "alpha_dropout") else "dropout", C.passthrough, R.FREE, named(name))
      for name in _COPIES],
    # pooling and reductions
    ("max_pool", C.pool, R.pool, [nn.modules.pooling._MaxPoolNd]),
    ("avg_pool", C.pool, R.pool, [nn.modules.pooling._AvgPoolNd]),
    ("adaptive_avg_pool", C.pool, R.pool, [nn.modules.pooling._AdaptiveAvgPoolNd]),
    ("adaptive_max_pool", C.pool, R.pool, [nn.modules.pooling._AdaptiveMaxPoolNd]),
    *[(_pool_kind(name), C.pool, R.pool, named(name)) for name in _POOLS],
    ("upsample", C.pool, R.ELEMENTWISE, [nn.Upsample] + named("interpolate", "upsample_nearest2d",
                                                              "upsample_bilinear2d")),
    *[(name, C.reduce, R.pool, named(name)) for name in _REDUCTIONS],
    ("max_reduce", C.maximum, R.maximum, named("max", "min")),
    ("topk", V.topk, R.pool, named("topk")),
    ("norm_reduce", C.norm_reduce, R.pool, named("norm", "linalg_vector_norm") + [torch.linalg.vector_norm]),
    # joins, splits, views
    ("cat", V.cat, R.FREE, named("cat", "concat", "concatenate")),
    ("stack", V.stack, R.FREE, named("stack")),
    ("split", V.split, R.FREE, named("split", "split_with_sizes")),
    ("chunk", V.chunk, R.FREE, named("chunk", "tensor_split")),
    ("unbind", V.unbind, R.FREE, named("unbind")),
    ("view", V.view, R.FREE, named("view", "reshape", "_unsafe_view", "_reshape_alias")),
    ("flatten", V.flatten, R.FREE, named("flatten") + [nn.Flatten]),
    ("unflatten", V.unflatten, R.FREE, named("unflatten")),
    ("unflatten", None, R.FREE, [nn.Unflatten]),
    ("permute", V.permute, R.FREE, named("permute")),
    ("transpose", V.transpose, R.FREE, named("transpose", "swapaxes", "swapdims")),
    ("transpose", V.t, R.FREE, named("t")),
    ("unsqueeze", V.unsqueeze, R.FREE, named("unsqueeze")),
    ("squeeze", V.squeeze, R.FREE, named("squeeze")),
    ("expand", V.expand, R.FREE, named("expand", "expand_as", "broadcast_to")),
    ("select", V.select, R.FREE, named("select")),
    ("repeat", V.repeat, R.FREE, named("repeat")),
    ("repeat_interleave", V.repeat_interleave, R.FREE, named("repeat_interleave")),
    ("slice", V.slice_rule, R.FREE, named("slice", "narrow")),
    ("pad", V.pad, R.FREE, named("pad", "constant_pad_nd")),
    ("getitem", V.getitem, R.FREE, [operator.getitem]),
    ("index", V.index_rows, R.FREE, named("index")),
    *[(name, None, R.FREE, named(name)) for name in _NO_RULE_COPIES],
    # sizes, creation, assertions
    ("size", C.getattr_rule, R.FREE, [builtins.getattr]),
    ("size", C.size, R.FREE, named("size", "sym_size")),
    ("size", C.no_axes, R.FREE, named("dim", "numel", "sym_numel")),
    ("create", C.create, R.FREE, named(*_CREATE)),
    ("create", C.sized(0), R.FREE, named("zeros", "ones", "empty", "full", "rand", "randn")),
    ("create", C.sized(1), R.FREE, named("new_zeros", "new_ones", "new_empty", "new_full")),
    ("create", C.passthrough, R.FREE, named(*_LIKE)),
    ("assert", C.no_axes, R.FREE, named("_assert_tensor_metadata", "_assert_async", "_assert")
     + [torch._assert]),
]
TABLE: Dict[Any, OpSpec] = {}
for _kind, _coupling, _flops, _targets in ROWS:
    for _target in _targets:
        TABLE.setdefault(_target, OpSpec(_kind, _coupling, _flops))

ELEMENTWISE_KINDS = frozenset(_ELEMENTWISE + _ACTIVATIONS + ("floordiv", "prelu"))
ACTIVATION_KINDS = frozenset(_ACTIVATIONS)
NORM_KINDS = frozenset({"batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm"})
WEIGHT_KINDS = frozenset({"linear", "conv"})


def module_spec(module: nn.Module) -> Optional[OpSpec]:
    for cls in type(module).__mro__:
        spec = TABLE.get(cls)
        if spec is not None:
            return spec
    return None


def lookup(gm: fx.GraphModule, node: fx.Node) -> Optional[OpSpec]:
    """The table row of ``node``'s op; None for placeholders, outputs, get_attr and unknown ops."""
    if node.op == "call_module":
        return module_spec(gm.get_submodule(str(node.target)))
    if node.op not in ("call_function", "call_method"):
        return None
    target = node.target
    spec = TABLE.get(target) if _hashable(target) else None
    if spec is None and isinstance(target, torch._ops.OpOverload):
        spec = TABLE.get(target.overloadpacket)
    return spec


def _hashable(target: Any) -> bool:
    try:
        hash(target)
        return True
    except TypeError:
        return False


def module_kind(module: nn.Module) -> Optional[str]:
    spec = module_spec(module)
    return spec.kind if spec else None


def op_kind(gm: fx.GraphModule, node: fx.Node) -> Optional[str]:
    """Canonical kind of ``node`` (None for placeholders/outputs/get_attr and unknown ops)."""
    spec = lookup(gm, node)
    return spec.kind if spec else None


def op_name(node: fx.Node) -> str:
    """A readable name of what ``node`` calls, for reports of ops not understood."""
    if node.op == "call_module":
        return str(node.target)
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return f"aten.{target._schema.name.split('::')[-1]}"
    return getattr(target, "__name__", str(target))
