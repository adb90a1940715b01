"""One comparison of a model's outputs with reference outputs, for every check that makes one.

Capture (`capture.tracer.check_capture`: the graph against the model), the native model against
the graph form (`native.relative_error`) and the exporters (`exporters.checks.compare_outputs`:
a runtime against PyTorch) all compare through `compare_to_reference`, so they agree on what counts as
a difference:

1. the outputs are the tensor (or NumPy array) leaves of any nesting of tuples, lists and dicts,
   in order; other leaves (None, ints) are not outputs;
2. a different number of outputs, or a different shape, is a structural mismatch;
3. NaN and inf must stand where the reference has them, with the same sign for inf;
4. outputs whose reference is not floating point (token ids, booleans) must be equal;
5. what is left is measured: the largest absolute difference and the largest reference magnitude
   over the reference's finite entries, in float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List

import numpy as np
import torch
import torch.utils._pytree as pytree


@dataclass(frozen=True)
class Comparison:
    """How far actual outputs are from expected ones, over all outputs.

    ``max_abs`` is inf and ``mismatch`` says why when the outputs cannot be measured entry by entry;
    ``within`` says every finite entry met ``|a - e| <= atol + rtol |e|`` (the tolerances given).
    """

    max_abs: float = 0.0      # largest |actual - expected| over the expected finite entries
    scale: float = 0.0        # largest |expected| over the finite entries
    mismatch: str = ""        # what differs beyond measuring ("" when nothing does)
    structural: bool = False  # the mismatch is in the count or shapes of the outputs
    within: bool = True

    @property
    def relative(self) -> float:
        """max_abs / scale: 0 for equal outputs, inf for a mismatch or a difference against a zero scale."""
        if self.mismatch or not math.isfinite(self.max_abs):
            return math.inf
        return self.max_abs / self.scale if self.scale > 0 else (0.0 if self.max_abs == 0 else math.inf)

    @property
    def close(self) -> bool:
        """No mismatch, and every finite entry within the tolerances."""
        return not self.mismatch and self.within


def output_leaves(outputs: Any) -> List[Any]:
    """The tensors and NumPy arrays among ``outputs``' leaves (any nesting of tuples, lists, dicts), in order."""
    return [leaf for leaf in pytree.tree_leaves(outputs) if isinstance(leaf, (torch.Tensor, np.ndarray))]


def tensor_leaves(outputs: Any) -> List[torch.Tensor]:
    """The tensors among ``outputs``' leaves, in order: what a model's forward returns, flattened."""
    return [leaf for leaf in pytree.tree_leaves(outputs) if isinstance(leaf, torch.Tensor)]


def _as_double(value: Any) -> torch.Tensor:
    tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
    return tensor.detach().to("cpu", torch.complex128 if tensor.is_complex() else torch.float64)


def _is_float(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_floating_point() or value.is_complex()
    return np.issubdtype(value.dtype, np.inexact)


def compare_to_reference(actual: Any, expected: Any, rtol: float = 0.0, atol: float = 0.0) -> Comparison:
    """Compare ``actual`` with the reference ``expected`` (see the module docstring)."""
    got, want = output_leaves(actual), output_leaves(expected)
    if len(got) != len(want):
        return Comparison(math.inf, 0.0, f"{len(got)} outputs where {len(want)} were expected", structural=True)
    max_abs, scale, within = 0.0, 0.0, True
    for i, (a, e) in enumerate(zip(got, want)):
        if tuple(a.shape) != tuple(e.shape):
            return Comparison(math.inf, scale, f"output {i} has shape {tuple(a.shape)} where {tuple(e.shape)} "
                                               "was expected", structural=True)
        exact = not _is_float(e)
        a, e = _as_double(a), _as_double(e)
        if exact:
            if not torch.equal(a, e):
                return Comparison(math.inf, scale, f"output {i} ({len(e.shape)}-d, not floating point) differs")
            continue
        if bool(torch.isfinite(e).all()) and bool(torch.isfinite(a).all()):
            # the common case, without the masks and gathers below: logits of a large vocabulary make
            # this comparison cost as much as the forward that produced them
            difference, magnitude = (a - e).abs(), e.abs()
        else:
            finite = torch.isfinite(e)
            infinite = torch.isinf(e)
            if not (torch.equal(torch.isnan(a), torch.isnan(e)) and torch.equal(torch.isinf(a), infinite)
                    and torch.equal(a[infinite], e[infinite])):
                return Comparison(math.inf, scale, f"output {i} has NaN or inf where the reference has other values")
            if not finite.any():
                continue
            difference, magnitude = (a[finite] - e[finite]).abs(), e[finite].abs()
        if difference.numel():
            max_abs = max(max_abs, float(difference.max()))
            scale = max(scale, float(magnitude.max()))
            within = within and bool((difference <= atol + rtol * magnitude).all())
    return Comparison(max_abs, scale, within=within)
