"""Inputs for an ONNX file: its input specs, and random feeds of a chosen batch size.

The exporter records the example inputs in the file's metadata (``sift.inputs``: shapes and,
for token ids, the vocabulary bound), so any tool can feed a sift file without the model. For
other files the specs come from the graph: the first symbolic dim is the batch; any other
symbolic dim needs ``--input-shape``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..capture.sources import parse_input_shape
from ..errors import UserInputError
from .weights import META_INPUTS, get_metadata

Dim = Union[int, str]

_ONNX_DTYPES = {1: np.float32, 10: np.float16, 11: np.float64, 6: np.int32, 7: np.int64, 9: np.bool_}


@dataclass
class InputSpec:
    """One graph input: its name, dims (ints, or names of symbolic dims), dtype and example shape."""

    name: str
    dims: Tuple[Dim, ...]
    dtype: type
    example: Optional[Tuple[int, ...]] = None   # the exporter's example shape, if recorded
    high: Optional[int] = None                  # exclusive bound of integer inputs (vocabulary size)

    def describe(self) -> str:
        return f"{self.name} [{', '.join(str(d) for d in self.dims)}] {np.dtype(self.dtype).name}"


def input_specs(model) -> List[InputSpec]:
    """The graph inputs that are not initializers, with what the metadata adds."""
    inits = {init.name for init in model.graph.initializer}
    recorded = {r["name"]: r for r in (get_metadata(model, META_INPUTS) or []) if isinstance(r, dict)}
    specs = []
    for value in model.graph.input:
        if value.name in inits:
            continue
        tensor = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim)
        dtype = _ONNX_DTYPES.get(tensor.elem_type)
        if dtype is None:
            raise UserInputError(f"input {value.name!r} has ONNX element type {tensor.elem_type}, which sift "
                                 "cannot feed (float, int32/64 and bool are supported)")
        record = recorded.get(value.name, {})
        example = tuple(record["shape"]) if "shape" in record else None
        specs.append(InputSpec(value.name, dims, dtype, example, record.get("high")))
    return specs


def inputs_metadata(names: Sequence[str], tensors: Sequence) -> List[dict]:
    """What the exporter records about its example inputs (torch tensors)."""
    records = []
    for name, t in zip(names, tensors):
        record = {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
        if not t.is_floating_point() and t.numel():
            record["high"] = int(t.max()) + 1
        records.append(record)
    return records


def resolve_shape(spec: InputSpec, batch_size: Optional[int], override: Optional[Tuple[int, ...]] = None
                  ) -> Tuple[int, ...]:
    """The concrete shape to feed ``spec`` with, or a `UserInputError` saying what is missing."""
    if override is not None:
        if len(override) != len(spec.dims) or any(isinstance(d, int) and d > 0 and d != o
                                                   for d, o in zip(spec.dims, override)):
            raise UserInputError(f"input shape {','.join(map(str, override))} does not fit the model's input "
                                 f"{spec.describe()}")
        shape = list(override)
        if batch_size is not None and shape and not (isinstance(spec.dims[0], int) and spec.dims[0] > 0):
            shape[0] = batch_size
        return tuple(shape)
    shape = []
    for axis, dim in enumerate(spec.dims):
        if isinstance(dim, int) and dim > 0:
            shape.append(dim)
        elif axis == 0 and batch_size is not None:
            shape.append(batch_size)
        elif spec.example is not None and len(spec.example) == len(spec.dims):
            shape.append(spec.example[axis])
        elif axis == 0:
            shape.append(1)  # an unnamed batch: one sample
        else:
            raise UserInputError(f"input {spec.describe()}: dim {axis} ({dim}) has no size; pass --input-shape")
    return tuple(shape)


def random_feeds(specs: Sequence[InputSpec], batch_size: Optional[int] = None,
                 overrides: Optional[Dict[str, Tuple[int, ...]]] = None, seed: int = 0) -> Dict[str, np.ndarray]:
    """Standard-normal floats, or integers below the recorded bound (2 if unknown), per input."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        shape = resolve_shape(spec, batch_size, (overrides or {}).get(spec.name))
        if np.issubdtype(spec.dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype is np.bool_:
            feeds[spec.name] = np.ones(shape, dtype=np.bool_)
        else:
            feeds[spec.name] = rng.integers(0, spec.high or 2, size=shape).astype(spec.dtype)
    return feeds


def batch_of(feeds: Dict[str, np.ndarray]) -> int:
    """The batch size of a feed (first dim of the first input; 1 for scalars)."""
    first = next(iter(feeds.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1


def parse_shapes(text: Optional[str], specs: Sequence[InputSpec]) -> Optional[Dict[str, Tuple[int, ...]]]:
    """``--input-shape`` for the first input ('1,3,224,224'), or per input ('ids=1,128;mask=1,128')."""
    if not text:
        return None
    if "=" not in text:
        if not specs:
            raise UserInputError("the model has no inputs to shape")
        return {specs[0].name: parse_input_shape(text)}
    shapes = {}
    known = {s.name for s in specs}
    for part in text.split(";"):
        name, _, dims = part.partition("=")
        if name.strip() not in known:
            raise UserInputError(f"--input-shape names input {name.strip()!r}; the model's inputs are "
                                 f"{', '.join(sorted(known))}")
        shapes[name.strip()] = parse_input_shape(dims)
    return shapes
