"""The one output comparison (`sift_compiler.compare`) that capture, the native check and the exporters share."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from sift_compiler.capture.tracer import check_capture
from sift_compiler.compare import compare_to_reference, output_leaves
from sift_compiler.errors import CaptureError, ExportError
from sift_compiler.exporters.checks import compare_outputs
from sift_compiler.native import relative_error


def test_equal_outputs_measure_zero():
    x = torch.randn(3, 4)
    comparison = compare_to_reference([x], [x.clone()])
    assert comparison.close and comparison.max_abs == 0.0 and comparison.relative == 0.0
    assert comparison.scale == pytest.approx(float(x.abs().max()))


def test_the_error_is_the_largest_difference_over_the_largest_reference():
    expected = [torch.tensor([1.0, -4.0]), torch.tensor([[2.0]])]
    actual = [torch.tensor([1.5, -4.0]), torch.tensor([[1.0]])]
    comparison = compare_to_reference(actual, expected)
    assert (comparison.max_abs, comparison.scale, comparison.relative) == (1.0, 4.0, 0.25)
    assert not comparison.close and not comparison.mismatch  # measured, not within zero tolerance
    assert compare_to_reference(actual, expected, atol=1.0).close
    assert not compare_to_reference(actual, expected, rtol=0.3).close  # 2 -> 1 is 0.5 of 2, beyond 0.3


def test_nested_outputs_are_flattened_in_order_and_other_leaves_ignored():
    a, b, c = torch.ones(2), torch.zeros(3), torch.full((1,), 5.0)
    nested = {"logits": a, "past": ((b, None), [c, 7])}
    assert [t.shape for t in output_leaves(nested)] == [a.shape, b.shape, c.shape]
    assert compare_to_reference(nested, [a, b, c]).close
    swapped = {"logits": a, "past": ((c, None), [b, 7])}
    assert compare_to_reference(swapped, nested).structural


def test_different_counts_and_shapes_are_structural_mismatches():
    x = torch.randn(2, 3)
    count = compare_to_reference([x, x], [x])
    assert count.structural and count.mismatch == "2 outputs where 1 were expected" and count.relative == math.inf
    shape = compare_to_reference([x.T], [x])
    assert shape.structural and "output 0 has shape (3, 2) where (2, 3)" in shape.mismatch
    with pytest.raises(ExportError, match=r"shape \(3, 2\) where \(2, 3\)"):
        compare_outputs([x.T.numpy()], [x.numpy()])
    assert relative_error([x.T], [x]) == math.inf


def test_nan_and_inf_must_stand_where_the_reference_has_them():
    reference = torch.tensor([1.0, float("nan"), float("inf"), -float("inf")])
    assert compare_to_reference(reference.clone(), reference).close  # NaN matches NaN in its place
    assert relative_error([reference.clone()], [reference]) == 0.0
    for wrong in ([1.0, 0.0, math.inf, -math.inf],            # a number where NaN is
                  [float("nan")] * 2 + [math.inf, -math.inf],  # NaN where a number is
                  [1.0, float("nan"), -math.inf, -math.inf],   # inf of the other sign
                  [1.0, float("nan"), 3.0, -math.inf]):        # a number where inf is
        comparison = compare_to_reference(torch.tensor(wrong), reference)
        assert comparison.mismatch and not comparison.structural and comparison.relative == math.inf, wrong
        error = compare_outputs([np.array(wrong, dtype=np.float32)], [reference.numpy()])  # the export check's view
        assert error.max_abs == math.inf and error.rel == math.inf, wrong


def test_integer_outputs_must_be_equal():
    ids = torch.tensor([[3, 1, 4]])
    assert compare_to_reference(ids.clone(), ids).close
    off = compare_to_reference(ids + 1, ids)
    assert off.mismatch == "output 0 (2-d, not floating point) differs" and off.relative == math.inf
    assert relative_error([torch.tensor([True, False])], [torch.tensor([True, True])]) == math.inf


def test_numpy_and_torch_outputs_compare_alike():
    expected = np.array([[0.5, -2.0]], dtype=np.float32)
    actual = torch.tensor([[0.25, -2.0]], dtype=torch.float16)
    assert compare_to_reference(actual, expected).max_abs == 0.25
    error = compare_outputs([actual.numpy()], [expected])
    assert (error.max_abs, error.scale) == (0.25, 2.0)


def test_a_zero_reference_makes_any_difference_infinite_and_none_zero():
    zero = torch.zeros(4)
    assert relative_error([zero.clone()], [zero]) == 0.0
    assert relative_error([zero + 1e-9], [zero]) == math.inf


class Doubler(nn.Module):
    def forward(self, x):
        return {"twice": 2 * x, "ids": x.argmax(-1)}


def test_capture_check_uses_the_comparison():
    x = torch.randn(2, 5)
    gm = fx.symbolic_trace(Doubler())
    check_capture(gm, (x,), {}, [2 * x, x.argmax(-1)], "Doubler")  # reproduces: no error
    with pytest.raises(CaptureError, match="Doubler does not reproduce.*outputs differ by up to"):
        check_capture(gm, (x,), {}, [2 * x + 1e-2, x.argmax(-1)], "Doubler")
    with pytest.raises(CaptureError, match="1 outputs where 2 were expected|2 outputs where 1 were expected"):
        check_capture(gm, (x,), {}, [2 * x], "Doubler")
