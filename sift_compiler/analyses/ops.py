"""One table that names what a graph node does, whichever capture produced it.

``op_kind(gm, node)`` returns a short canonical name: ``"linear"``, ``"conv"``, ``"matmul"``,
``"sdpa"``, ``"batch_norm"``, ``"layer_norm"``, ``"add"``, ``"relu"``, ``"view"``... for
`call_module` nodes (by module type), `call_function` nodes (torch functions, operators and ATen
overloads) and `call_method` nodes alike. Analyses key their rules on these names, never on
strings taken from a node's name.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn

from ..sparsity.layers import MaskedLayer

MODULE_KINDS = [
    (nn.Linear, "linear"),
    (nn.modules.conv._ConvTransposeNd, "conv_transpose"),
    (nn.modules.conv._ConvNd, "conv"),
    (nn.Embedding, "embedding"),
    (nn.EmbeddingBag, "embedding"),
    (nn.modules.batchnorm._BatchNorm, "batch_norm"),
    (nn.LayerNorm, "layer_norm"),
    (nn.GroupNorm, "group_norm"),
    (nn.modules.instancenorm._InstanceNorm, "instance_norm"),
    (nn.ReLU, "relu"), (nn.ReLU6, "relu6"), (nn.GELU, "gelu"), (nn.SiLU, "silu"), (nn.Hardswish, "hardswish"),
    (nn.Hardsigmoid, "hardsigmoid"), (nn.Sigmoid, "sigmoid"), (nn.Tanh, "tanh"), (nn.Mish, "mish"),
    (nn.LeakyReLU, "leaky_relu"), (nn.ELU, "elu"), (nn.PReLU, "prelu"), (nn.Softmax, "softmax"),
    (nn.Dropout, "dropout"), (nn.modules.dropout._DropoutNd, "dropout"), (nn.Identity, "identity"),
    (nn.modules.pooling._MaxPoolNd, "max_pool"), (nn.modules.pooling._AvgPoolNd, "avg_pool"),
    (nn.modules.pooling._AdaptiveAvgPoolNd, "adaptive_avg_pool"),
    (nn.modules.pooling._AdaptiveMaxPoolNd, "adaptive_max_pool"),
    (nn.Flatten, "flatten"), (nn.Unflatten, "unflatten"),
]
if hasattr(nn, "RMSNorm"):
    MODULE_KINDS.append((nn.RMSNorm, "rms_norm"))

# Base names of functions/methods/ATen ops -> canonical kind.
_ALIASES = {
    "linear": "linear", "addmm": "matmul", "matmul": "matmul", "mm": "matmul", "bmm": "matmul",
    "baddbmm": "matmul", "einsum": "einsum",
    "conv1d": "conv", "conv2d": "conv", "conv3d": "conv", "convolution": "conv",
    "scaled_dot_product_attention": "sdpa", "_scaled_dot_product_flash_attention_for_cpu": "sdpa",
    "_scaled_dot_product_efficient_attention": "sdpa", "_scaled_dot_product_flash_attention": "sdpa",
    "batch_norm": "batch_norm", "_native_batch_norm_legit_no_training": "batch_norm",
    "_native_batch_norm_legit": "batch_norm", "native_batch_norm": "batch_norm",
    "layer_norm": "layer_norm", "native_layer_norm": "layer_norm", "group_norm": "group_norm",
    "native_group_norm": "group_norm", "rms_norm": "rms_norm", "instance_norm": "instance_norm",
    "embedding": "embedding",
    "add": "add", "iadd": "add", "add_": "add", "sub": "sub", "rsub": "sub", "mul": "mul", "imul": "mul",
    "mul_": "mul", "truediv": "div", "div": "div", "floordiv": "div", "neg": "neg", "pow": "pow",
    "sqrt": "sqrt", "rsqrt": "sqrt", "exp": "exp", "log": "log", "abs": "abs",
    "relu": "relu", "relu_": "relu", "relu6": "relu6", "hardtanh": "relu6", "hardtanh_": "relu6",
    "gelu": "gelu", "silu": "silu", "silu_": "silu", "sigmoid": "sigmoid", "tanh": "tanh",
    "hardswish": "hardswish", "hardswish_": "hardswish", "hardsigmoid": "hardsigmoid", "mish": "mish",
    "leaky_relu": "leaky_relu", "elu": "elu", "softmax": "softmax", "_softmax": "softmax",
    "log_softmax": "softmax", "dropout": "dropout", "native_dropout": "dropout",
    "max_pool1d": "max_pool", "max_pool2d": "max_pool", "max_pool3d": "max_pool",
    "max_pool2d_with_indices": "max_pool", "avg_pool1d": "avg_pool", "avg_pool2d": "avg_pool",
    "avg_pool3d": "avg_pool", "adaptive_avg_pool1d": "adaptive_avg_pool",
    "adaptive_avg_pool2d": "adaptive_avg_pool", "adaptive_avg_pool3d": "adaptive_avg_pool",
    "_adaptive_avg_pool2d": "adaptive_avg_pool", "adaptive_max_pool2d": "adaptive_max_pool",
    "mean": "mean", "sum": "sum", "amax": "max_reduce", "max": "max_reduce",
    "cat": "cat", "concat": "cat", "concatenate": "cat", "stack": "stack", "split": "split",
    "split_with_sizes": "split", "chunk": "chunk", "unbind": "unbind", "getitem": "getitem",
    "view": "view", "reshape": "view", "_unsafe_view": "view", "flatten": "flatten", "unflatten": "unflatten",
    "permute": "permute", "transpose": "transpose", "t": "transpose", "contiguous": "identity",
    "clone": "identity", "alias": "identity", "to": "identity", "type_as": "identity", "detach": "identity",
    "squeeze": "squeeze", "unsqueeze": "unsqueeze", "expand": "expand", "expand_as": "expand",
    "repeat": "repeat", "slice": "slice", "select": "select", "index": "index", "narrow": "slice",
    "size": "size", "sym_size": "size", "dim": "size", "_assert_tensor_metadata": "assert",
}
ELEMENTWISE_KINDS = frozenset({
    "add", "sub", "mul", "div", "neg", "pow", "sqrt", "exp", "log", "abs", "relu", "relu6", "gelu", "silu",
    "sigmoid", "tanh", "hardswish", "hardsigmoid", "mish", "leaky_relu", "elu", "prelu",
})
ACTIVATION_KINDS = frozenset({"relu", "relu6", "gelu", "silu", "hardswish", "mish", "leaky_relu", "elu"})
NORM_KINDS = frozenset({"batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm"})
POOL_KINDS = frozenset({"max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool", "mean", "sum", "max_reduce"})
WEIGHT_KINDS = frozenset({"linear", "conv"})


def _base_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target.__name__
    if isinstance(target, str):
        return target
    return getattr(target, "__name__", str(target))


def module_kind(module: nn.Module) -> Optional[str]:
    for cls, kind in MODULE_KINDS:
        if isinstance(module, cls):
            return kind
    return None


def op_kind(gm: fx.GraphModule, node: fx.Node) -> Optional[str]:
    """Canonical kind of ``node`` (None for placeholders/outputs/get_attr and unknown ops)."""
    if node.op == "call_module":
        return module_kind(gm.get_submodule(str(node.target)))
    if node.op in ("call_function", "call_method"):
        name = _base_name(node.target)
        return _ALIASES.get(name, _ALIASES.get(name.rstrip("_")))
    return None


def is_masked(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), MaskedLayer)


def op_name(node: fx.Node) -> str:
    """A readable name of what ``node`` calls, for reports of ops not understood."""
    if node.op == "call_module":
        return str(node.target)
    return _base_name(node.target)
