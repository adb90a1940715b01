"""FlopAnalysis against counts made without it: torch's FlopCounterMode, and the non-zeros of the
weights a compiled model actually computes with."""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import sift_compiler as sift
from checks import independent_weight_flops
from model_zoo import MODELS

# (layers, heads, tokens) of the transformer cases in model_zoo: softmax costs 3 per score
ATTENTION = {"gpt2": (2, 4, 16), "bert": (2, 4, 16)}


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "gpt2", "bert"])
def test_dense_report_matches_flop_counter(name):
    """Weight layers against FlopCounterMode (conv + mm/addmm, 2 x MAC). Attention against the
    batched matmuls of sdpa's math kernel (CPU's fused kernel has no FLOP formula in torch) plus
    our softmax convention."""
    case = MODELS[name]()
    model = case.model.eval()
    report = sift.flops(model, case.args, case.kwargs)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(*case.args, **case.kwargs)
    counts = {str(op): v for op, v in counter.get_flop_counts()["Global"].items()}
    weight = sum(v for op, v in counts.items() if op in ("aten.convolution", "aten.mm", "aten.addmm"))
    assert report.categories["dense"]["weight"] == pytest.approx(weight, rel=1e-6)
    layers, heads, tokens = ATTENTION.get(name, (0, 0, 0))
    softmax = 3 * layers * heads * tokens * tokens
    assert report.categories["dense"]["attention"] == pytest.approx(counts.get("aten.bmm", 0) + softmax, rel=1e-6)
    assert not report.uncounted_ops


@pytest.mark.parametrize("transform", ["wide", "parallel"])
def test_flops_of_a_compiled_model_count_its_non_zeros(transform):
    """`sift.flops` of a compiled module against FlopCounterMode scaled by the non-zeros of W * M."""
    case = MODELS["resnet18"]()
    result = sift.compile(case.model, transform, 0.75, case.args)
    report = sift.flops(result.module, case.args)
    assert report.sift_flops == pytest.approx(independent_weight_flops(result.module, case.args, {}), rel=1e-6)
    dense = independent_weight_flops(case.model, case.args, {})
    assert report.sift_flops == pytest.approx(dense, rel=0.005)  # iso-FLOP, by the same independent count
    masked = [layer for layer in report.layers if layer.transform == "masked"]
    assert masked and all(layer.sparsity > 0.7 for layer in masked)
