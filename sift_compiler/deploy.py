"""GPU inference of 2:4 models: swap masked linears for torch's semi-structured sparse weights.

A model compiled with ``pattern="2:4"`` (``sift.compile(model, "wide", 0.5, (x,), pattern="2:4",
round_to=64)``) keeps, in every 4 consecutive inputs of every output row of its sparse Linear
layers, exactly 2 non-zeros: the pattern NVIDIA's sparse tensor cores run (Ampere and later).
`to_semi_structured` replaces each such layer with a plain ``nn.Linear`` whose weight is
``torch.sparse.to_sparse_semi_structured(W * M)`` (cuSPARSELt, or CUTLASS where cuSPARSELt is
missing) in fp16 or bf16; layers kept dense stay as they are.

>>> plan = sift.deploy.semi_structured_plan(model)        # which layers, and why not (runs on CPU)
>>> model = sift.deploy.to_semi_structured(model.cuda())  # CUDA only; refuses with the reason otherwise

What is saved is the masked model (``sift.save`` or a state dict: the 2:4 masks and the
weights with their zeros); the swap happens after loading, on the GPU that runs it, because the
compressed layout (values plus 2-bit metadata, reordered for the kernel) belongs to the backend
and the device, not to the checkpoint.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from .errors import SiftWarning, UserInputError
from .sparsity.layers import MaskedLinear, iter_masked

HALF_DTYPES = (torch.float16, torch.bfloat16)
MIN_CAPABILITY = (8, 0)   # sparse tensor cores: Ampere (sm_80) and later


@dataclass
class SemiStructuredLayer:
    """One sparse layer of the plan: swapped when ``reason`` is empty."""

    name: str
    shape: Tuple[int, int]       # (out features, in features)
    kind: str                    # "linear" or the masked layer's type name
    reason: str = ""             # why it is not swapped ("" when it is)

    @property
    def swapped(self) -> bool:
        return not self.reason


def is_two_four(mask: torch.Tensor) -> bool:
    """True when every run of 4 consecutive entries of every row of a 2-D mask holds exactly 2."""
    if mask.dim() != 2 or mask.shape[1] % 4:
        return False
    return bool((mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all())


def backend_shape_multiple(dtype: torch.dtype = torch.float16) -> Tuple[str, int, int]:
    """(backend, row multiple, column multiple) the semi-structured weight needs for ``dtype``.

    cuSPARSELt where torch has it, else CUTLASS (which asks for larger tiles)."""
    from torch.sparse import SparseSemiStructuredTensor as Base
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT as CuSparseLt
    from torch.sparse import SparseSemiStructuredTensorCUTLASS as Cutlass
    use_cutlass = Base._FORCE_CUTLASS or not torch.backends.cusparselt.is_available()
    cls = Cutlass if use_cutlass else CuSparseLt
    limits = cls._DTYPE_SHAPE_CONSTRAINTS[dtype]
    return cls.BACKEND, limits.sparse_min_rows, limits.sparse_min_cols


def semi_structured_plan(model: nn.Module, dtype: torch.dtype = torch.float16) -> List[SemiStructuredLayer]:
    """Every sparse masked layer of ``model`` (density < 1) and whether `to_semi_structured` swaps it.

    Runs anywhere (no GPU needed): the 2:4 check of each mask and the backend's shape rule.
    """
    backend, rows, cols = backend_shape_multiple(dtype)
    plan = []
    for name, layer in iter_masked(model):
        if layer.target_density >= 1.0:
            continue  # kept dense by its transform: nothing to compress
        shape = tuple(int(d) for d in layer.weight.shape)
        if not isinstance(layer, MaskedLinear):
            plan.append(SemiStructuredLayer(name, shape, type(layer).__name__,
                                            "not a Linear (torch's 2:4 kernels run matrix products only)"))
            continue
        reason = ""
        if not is_two_four(layer.weight_mask):
            reason = "mask is not 2:4 (compile with pattern='2:4' at sparsity 0.5)"
        elif shape[0] % rows or shape[1] % cols:
            reason = (f"shape {shape[0]}x{shape[1]} is not a multiple of {rows}x{cols} ({backend}, {dtype}); "
                      f"compile with round_to={max(rows, cols)} and widths that are multiples of it")
        plan.append(SemiStructuredLayer(name, shape, "linear", reason))
    return plan


def to_semi_structured(model: nn.Module, dtype: Optional[torch.dtype] = None,
                       strict: bool = False) -> nn.Module:
    """Replace the 2:4-masked linears of ``model`` (on a CUDA GPU) with semi-structured sparse weights.

    ``dtype``: float16 or bfloat16 (default: the model's, which must be one of them; cast first
    with ``model.half()``). Layers whose mask is not 2:4 make it refuse (`UserInputError` naming
    them): a 2:4 kernel would compute another function. Linears whose shape the backend cannot
    tile stay dense-masked with a `SiftWarning` (``strict=True``: an error). The model is changed
    in place and returned; run it under ``torch.no_grad()`` (the sparse weights are for inference).
    """
    device = _device_of(model)
    reason = cuda_unavailable_reason(device)
    if reason:
        raise UserInputError(f"to_semi_structured: {reason}")
    dtype = dtype or _dtype_of(model)
    if dtype not in HALF_DTYPES:
        raise UserInputError(f"to_semi_structured: 2:4 kernels take float16 or bfloat16 weights, the model is {dtype}; "
                             "cast it first (model.half() or model.to(torch.bfloat16)) or pass dtype=")
    plan = semi_structured_plan(model, dtype)
    if not plan:
        raise UserInputError("to_semi_structured: the model has no sparse masked layers; compile it first with "
                             "sift.compile(model, 'wide', 0.5, (x,), pattern='2:4', round_to=64)")
    not_24 = [p for p in plan if p.kind == "linear" and "not 2:4" in p.reason]
    if not_24:
        raise UserInputError(f"to_semi_structured: {len(not_24)} sparse linear(s) do not have 2:4 masks ("
                             + ", ".join(p.name for p in not_24[:5]) + "); compile with pattern='2:4' at sparsity "
                             "0.5 and train with RigL/SET/Static(pattern='2:4')")
    skipped = [p for p in plan if not p.swapped]
    if skipped:
        message = (f"to_semi_structured: {len(skipped)} of {len(plan)} sparse layers stay dense-masked: "
                   + "; ".join(f"{p.name}: {p.reason}" for p in skipped[:3]))
        if strict:
            raise UserInputError(message)
        warnings.warn(message, SiftWarning, stacklevel=2)
    from torch.sparse import to_sparse_semi_structured
    for item in plan:
        if item.swapped:
            model.set_submodule(item.name, _sparse_linear(model.get_submodule(item.name), dtype,
                                                         to_sparse_semi_structured))
    return model


def cuda_unavailable_reason(device: Optional[torch.device] = None) -> str:
    """Why 2:4 kernels cannot run here (no CUDA, model not on it, GPU too old), or ''."""
    if not torch.cuda.is_available():
        return ("2:4 semi-structured kernels run on NVIDIA GPUs (compute capability >= 8.0) only, and "
                "torch.cuda.is_available() is False here; on CPU run the masked model as it is, or export ONNX")
    if device is None or device.type != "cuda":
        return f"the model is on {device}, not on a CUDA device: move it first (model.cuda())"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return (f"{torch.cuda.get_device_name(device)} has compute capability {capability[0]}.{capability[1]}; "
                "2:4 sparse tensor cores need 8.0 or later (Ampere, Hopper, ...)")
    return ""


def _sparse_linear(layer: MaskedLinear, dtype: torch.dtype, compress) -> nn.Linear:
    """A plain nn.Linear holding the compressed 2:4 form of the layer's masked weight."""
    with torch.no_grad():
        weight = (layer.weight * layer.weight_mask.to(layer.weight.dtype)).to(dtype).contiguous()
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                          device=weight.device, dtype=dtype)
        plain.weight = nn.Parameter(compress(weight), requires_grad=False)
        if layer.bias is not None:
            plain.bias = nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)
    return plain


def _device_of(model: nn.Module) -> Optional[torch.device]:
    for tensor in model.parameters():
        return tensor.device
    return None


def _dtype_of(model: nn.Module) -> torch.dtype:
    for _, layer in iter_masked(model):
        return layer.weight.dtype
    return torch.float32
