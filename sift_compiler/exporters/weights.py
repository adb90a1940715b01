"""The weights inside an ONNX file: which initializer is which sift layer, and how sparse each is.

After export, names no longer say which layer a weight came from (Conv+BatchNorm folding renames
weights to ``onnx::Conv_123``; Linear on 3-d inputs becomes a transposed ``onnx::MatMul_45``). So
the exporter matches by content instead: a sparse layer's zero pattern is random and unique,
and both folding (a per-row scale) and transposition keep it. `match_layers` pairs every masked
layer with the initializers that carry its pattern, and the exporter records the pairing in the
file's metadata (``sift.layers``), so `sift-check` can test the file later without the model.

``load_onnx(path)`` reads a file with errors that say what is wrong with it (missing, not ONNX,
truncated, external data missing).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch

from ..errors import UserInputError, first_line
from ..sparsity.layers import iter_masked

WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
META_LAYERS = "sift.layers"
META_INPUTS = "sift.inputs"
META_EXPORT = "sift.export"
META_DEEPSPARSE = "sift.deepsparse"   # {"runs": false, "reason": ...}: exporters/outcome.py


def load_onnx(path: str, load_external_data: bool = True):
    """``onnx.load(path)`` with a clear `UserInputError` for a missing, foreign or truncated file."""
    import onnx  # lazy: onnx takes 0.2 s to import, and `import sift_compiler` does not need it
    from google.protobuf.message import DecodeError  # onnx's protobuf, loaded with it
    if not os.path.exists(path):
        raise UserInputError(f"ONNX file {path!r} does not exist")
    if os.path.isdir(path):
        raise UserInputError(f"{path!r} is a directory, not an ONNX file")
    try:
        model = onnx.load(path, load_external_data=load_external_data)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as e:
        raise UserInputError(f"{path!r} is not a readable ONNX model (truncated or not ONNX: "
                             f"{type(e).__name__}: {first_line(e) or 'cannot parse'})") from None
    except FileNotFoundError as e:
        raise UserInputError(f"{path!r} refers to external data that is missing: {e}") from None
    if not model.graph.node or not model.opset_import:
        raise UserInputError(f"{path!r} is not a usable ONNX model (no graph nodes or no opset: truncated or "
                             "not ONNX)")
    return model


@dataclass
class WeightTensor:
    """One constant weight of a Conv/Gemm/MatMul node, in torch layout ((out, in, ...))."""

    initializer: str
    op: str
    node: str
    shape: Tuple[int, ...]
    nnz: int

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / self.numel if self.numel else 0.0


def _constant_sources(graph) -> Dict[str, str]:
    """Value name -> initializer name, through chains of Identity nodes (deduplicated weights)."""
    sources = {init.name: init.name for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Identity" and node.input and node.input[0] in sources:
            sources[node.output[0]] = sources[node.input[0]]
    return sources


def _torch_layout(node, array: np.ndarray) -> np.ndarray:
    """The weight as torch stores it: Gemm without transB and MatMul hold W^T."""
    if node.op_type == "MatMul" and array.ndim == 2:
        return array.T
    if node.op_type == "Gemm" and array.ndim == 2:
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return array if trans_b else array.T
    return array


def weight_arrays(model) -> List[Tuple[WeightTensor, np.ndarray]]:
    """Every constant weight of a Conv/Gemm/MatMul node with its array (torch layout), in graph order."""
    from onnx import numpy_helper  # lazy (see load_onnx)
    inits = {init.name: init for init in model.graph.initializer}
    sources = _constant_sources(model.graph)
    found: List[Tuple[WeightTensor, np.ndarray]] = []
    seen = set()
    for node in model.graph.node:
        if node.op_type not in WEIGHT_OPS or len(node.input) < 2:
            continue
        name = sources.get(node.input[1])
        if name is None or (name, node.op_type) in seen:
            continue
        array = numpy_helper.to_array(inits[name])
        if array.ndim < 2 or array.dtype.kind != "f":
            continue
        seen.add((name, node.op_type))
        array = _torch_layout(node, array)
        found.append((WeightTensor(name, node.op_type, node.name, tuple(array.shape),
                                   int(np.count_nonzero(array))), array))
    return found


# ---------------------------------------------------------------------------------------------
# Layer <-> initializer matching


@dataclass
class LayerSparsity:
    """A sift sparse layer as it ended up in the file."""

    layer: str
    initializer: str
    shape: Tuple[int, ...]
    target_density: float
    mask_nnz: int          # non-zeros of the layer's baked weight before export
    nnz: int               # non-zeros in the file
    parts: int = 1         # masks rounded separately (B for stacked parallel branches)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / self.numel

    @property
    def target_sparsity(self) -> float:
        return 1.0 - self.target_density

    @property
    def max_nnz(self) -> int:
        """The most non-zeros the target allows: each of ``parts`` masks rounds density * size to nearest."""
        return math.floor(self.target_density * self.numel + 0.5 * self.parts + 1e-9)


@dataclass
class LayerPattern:
    """A masked layer before export: its name, target and the non-zero pattern of its baked weight."""

    layer: str
    target_density: float
    nonzero: np.ndarray    # bool, torch layout
    parts: int = 1


def layer_patterns(module) -> List[LayerPattern]:
    """The masked layers of ``module`` (masks not baked yet), with their baked non-zero patterns."""
    patterns = []
    for name, layer in iter_masked(module):
        with torch.no_grad():
            baked = torch.where(layer.weight_mask, layer.weight, torch.zeros((), dtype=layer.weight.dtype))
        patterns.append(LayerPattern(name, float(getattr(layer, "target_density", 1.0)),
                                     (baked != 0).cpu().numpy(), int(getattr(layer, "mask_parts", 1))))
    return patterns


def _key(nonzero: np.ndarray) -> Tuple[Tuple[int, ...], bytes]:
    return tuple(nonzero.shape), np.packbits(nonzero, axis=None).tobytes()


def match_layers(patterns: Iterable[LayerPattern], model) -> Tuple[List[LayerSparsity], List[str]]:
    """Pair each sparse layer (target density < 1) with the initializers holding its pattern.

    Returns the pairs and the names of layers no initializer matches. A weight whose BatchNorm
    scale was exactly 0 gains zero rows; it still matches if its non-zeros are a subset of the
    layer's, and it is the only such candidate.
    """
    weights = weight_arrays(model)
    by_key: Dict[Tuple, List[Tuple[WeightTensor, np.ndarray]]] = {}
    for tensor, array in weights:
        by_key.setdefault(_key(array != 0), []).append((tensor, array))
    pairs, missing = [], []
    for pattern in patterns:
        if pattern.target_density >= 1.0:
            continue
        hits = by_key.get(_key(pattern.nonzero), [])
        if not hits:
            hits = [(t, a) for t, a in weights if a.shape == pattern.nonzero.shape
                    and not np.any((a != 0) & ~pattern.nonzero)]
            hits = hits if len(hits) == 1 else []
        if not hits:
            missing.append(pattern.layer)
        for tensor, _ in hits:
            pairs.append(LayerSparsity(pattern.layer, tensor.initializer, tensor.shape, pattern.target_density,
                                       int(pattern.nonzero.sum()), tensor.nnz, pattern.parts))
    return pairs, missing


# ---------------------------------------------------------------------------------------------
# Metadata


def set_metadata(model, key: str, value) -> None:
    """Store ``value`` as JSON under ``key`` in the model's metadata_props (replacing any old value)."""
    for prop in list(model.metadata_props):
        if prop.key == key:
            model.metadata_props.remove(prop)
    entry = model.metadata_props.add()
    entry.key, entry.value = key, json.dumps(value, sort_keys=True)


def get_metadata(model, key: str):
    """The JSON value stored under ``key``, or None."""
    for prop in model.metadata_props:
        if prop.key == key:
            try:
                return json.loads(prop.value)
            except ValueError:
                return None
    return None


def not_for_deepsparse(model) -> Optional[str]:
    """Why the exporter marked the file as not for DeepSparse (exporters/outcome.py), or None."""
    record = get_metadata(model, META_DEEPSPARSE)
    if isinstance(record, dict) and record.get("runs") is False:
        return str(record.get("reason") or "marked by the exporter")
    return None


def layers_to_metadata(pairs: List[LayerSparsity]) -> List[dict]:
    return [{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(p).items()} for p in pairs]


def layers_from_metadata(model) -> Optional[List[LayerSparsity]]:
    """The layer records of a file written by sift's exporter, with ``nnz`` re-counted from the file now."""
    records = get_metadata(model, META_LAYERS)
    if records is None:
        return None
    counts = {t.initializer: t.nnz for t, _ in weight_arrays(model)}
    layers = []
    for r in records:
        layers.append(LayerSparsity(r["layer"], r["initializer"], tuple(r["shape"]), float(r["target_density"]),
                                    int(r["mask_nnz"]), counts.get(r["initializer"], -1), int(r.get("parts", 1))))
    return layers
