"""ShapeAnalysis: the shape and dtype of every node's value, computed with fake tensors.

No real compute runs: a 10-branch Sparse Parallel ResNet-50 costs the same as the dense one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Set, Tuple

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensorMode

from ..errors import UnsupportedOpError, describe_node, first_line
from ..module_tools import eval_mode
from ..sparsity.layers import WEIGHT_LAYER_TYPES, MaskedLayer
from .manager import Analysis


@dataclass(frozen=True)
class TensorSpec:
    shape: Tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _spec(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return TensorSpec(tuple(int(d) for d in value.shape), value.dtype)
    return None


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.specs: Dict[str, Any] = {}

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        if isinstance(module, MaskedLayer):
            # The mask does not change shapes; skipping weight * mask saves real work on big layers.
            base = next(t for t in WEIGHT_LAYER_TYPES if isinstance(module, t))
            return base.forward(module, *args, **kwargs)
        return super().call_module(target, args, kwargs)

    def run_node(self, n: fx.Node) -> Any:
        try:
            out = super().run_node(n)
        except Exception as e:
            raise UnsupportedOpError(f"shape propagation failed at {describe_node(n)}: "
                                     f"{type(e).__name__}: {first_line(e)}") from e
        self.specs[n.name] = pytree.tree_map(_spec, out)
        return out


# An encoder-decoder returns its encoder's states next to its logits, for generate() to pass back
# (encoder_outputs=): they are d_model wide, an inner width Sparse Wide widens like any other.
INTERNAL_OUTPUTS = ("encoder_last_hidden_state",)


def internal_outputs(gm: fx.GraphModule) -> Set[str]:
    """Names of the output nodes that return internal states, not results (`INTERNAL_OUTPUTS`),
    read from the output's structure (a Hugging Face ModelOutput's keys)."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    flat = pytree.tree_leaves(out.args[0])
    info = getattr(gm.graph._codegen, "pytree_info", None)
    spec = getattr(info, "out_spec", None)
    structured = pytree.tree_unflatten(flat, spec) if spec is not None and spec.num_leaves == len(flat) \
        else out.args[0]
    # top-level keys read by hand: an output class registered without key functions (diffusers'
    # BaseOutput) has no key paths, and only the first level's name matters here
    if isinstance(structured, Mapping):
        items = structured.items()
    elif isinstance(structured, (tuple, list)):
        items = enumerate(structured)
    else:
        return set()
    return {leaf.name for key, value in items if any(name in str(key) for name in INTERNAL_OUTPUTS)
            for leaf in pytree.tree_leaves(value) if isinstance(leaf, fx.Node)}


@dataclass(frozen=True)
class ShapeMap:
    """node name -> TensorSpec (or a pytree of them for tuple outputs)."""

    specs: Dict[str, Any]

    def __getitem__(self, node: fx.Node) -> Optional[TensorSpec]:
        value = self.specs.get(node.name)
        return value if isinstance(value, TensorSpec) else None

    def value(self, node: fx.Node) -> Any:
        return self.specs.get(node.name)

    def outputs(self, gm: fx.GraphModule) -> Any:
        """The outputs' specs; internal states (`internal_outputs`) only by rank, their widths may change."""
        out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        internal = internal_outputs(gm)

        def spec(a):
            value = self.specs.get(a.name) if isinstance(a, fx.Node) else None
            if isinstance(value, TensorSpec) and a.name in internal:
                return f"internal state of rank {len(value.shape)}"
            return value
        return pytree.tree_map(spec, out.args[0])


_SHAPE_PRESERVING = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm, torch.nn.GroupNorm,
                     torch.nn.modules.instancenorm._InstanceNorm, torch.nn.ReLU, torch.nn.ReLU6, torch.nn.GELU,
                     torch.nn.SiLU, torch.nn.Hardswish, torch.nn.Sigmoid, torch.nn.Tanh, torch.nn.Dropout,
                     torch.nn.Identity)


class _MetaRecorder(_Recorder):
    """Runs the graph on meta tensors: parameters are swapped for meta copies per module call.
    Much cheaper than fake tensors per op; graphs that mix devices or read values fall back."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self._meta: Dict[int, torch.Tensor] = {}

    def _as_meta(self, t: torch.Tensor) -> torch.Tensor:
        meta = self._meta.get(id(t))
        if meta is None:
            meta = self._meta[id(t)] = torch.empty_like(t, device="meta")
        return meta

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        return self._as_meta(value) if isinstance(value, torch.Tensor) else value

    def call_function(self, target, args, kwargs):
        return super().call_function(target, *_on_meta(args, kwargs))

    def call_method(self, target, args, kwargs):
        return super().call_method(target, *_on_meta(args, kwargs))

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        if isinstance(module, _SHAPE_PRESERVING) and len(args) == 1 and isinstance(args[0], torch.Tensor):
            return torch.empty_like(args[0])  # norms, activations, dropout: nothing to compute
        state = {name: self._as_meta(t) for name, t in
                 list(module.named_parameters()) + list(module.named_buffers())}
        if isinstance(module, MaskedLayer):
            base = next(t for t in WEIGHT_LAYER_TYPES if isinstance(module, t))
            return _call_as(base, module, state, args, kwargs)
        return torch.func.functional_call(module, state, args, kwargs)


def _on_meta(args, kwargs):
    """Device arguments point at the meta device (``x.to(device=cpu)``, ``torch.ones(..., device=cpu)``
    in exported transformers graphs would leave it), so such graphs need no fake-tensor fallback."""
    meta = torch.device("meta")
    args = tuple(meta if isinstance(a, torch.device) else a for a in args)
    if "device" in kwargs:
        kwargs = {**kwargs, "device": meta}
    return args, kwargs


def _call_as(base: type, module, state, args, kwargs):
    """``base.forward`` of ``module`` with its tensors replaced by ``state`` (the mask is not used)."""
    with torch.nn.utils.stateless._reparametrize_module(module, state):
        return base.forward(module, *args, **kwargs)


def propagate_shapes(gm: fx.GraphModule, flat_inputs) -> ShapeMap:
    """Record every node's output spec without real compute (eval mode): on meta tensors, or on
    fake tensors for graphs the meta device cannot run."""
    with eval_mode(gm):  # batch norm in train mode would write running stats
        try:
            recorder = _MetaRecorder(gm)
            recorder.run(*[x.to("meta") if isinstance(x, torch.Tensor) else x for x in flat_inputs])
        except Exception:
            mode = FakeTensorMode(allow_non_fake_inputs=True)
            with mode:
                fake = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in flat_inputs]
                recorder = _Recorder(gm)
                recorder.run(*fake)
    return ShapeMap(recorder.specs)


class ShapeAnalysis(Analysis[ShapeMap]):
    name = "shapes"

    @classmethod
    def run(cls, unit) -> ShapeMap:
        return propagate_shapes(unit.module, unit.flat_inputs())
