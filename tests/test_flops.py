"""FlopAnalysis against torch's own FlopCounterMode, category by category."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import sift_compiler as sift
from model_zoo import MODELS


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "gpt2", "bert"])
def test_dense_report_matches_flop_counter(name):
    """Weight layers against FlopCounterMode (conv + mm/addmm, 2 x MAC). On CPU torch counts no
    FLOPs for its fused attention kernel; ours are in the separate "attention" category."""
    case = MODELS[name]()
    model = case.model.eval()
    report = sift.flops(model, case.args, case.kwargs)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(*case.args, **case.kwargs)
    counts = counter.get_flop_counts()["Global"]
    counted = sum(v for op, v in counts.items() if "convolution" in str(op) or "mm" in str(op))
    assert report.categories["dense"]["weight"] == pytest.approx(counted, rel=1e-6)
    assert (report.categories["dense"]["attention"] > 0) == (name in ("gpt2", "bert"))
    assert report.flop_ratio == 1.0


def test_flops_of_a_compiled_model_counts_masks():
    case = MODELS["resnet18"]()
    result = sift.compile(case.model, "wide", 0.75, case.args)
    report = sift.flops(result.module, case.args)
    assert report.sift_flops == pytest.approx(result.report.sift_flops)
    masked = [layer for layer in report.layers if layer.transform == "masked"]
    assert masked and all(layer.sparsity > 0.7 for layer in masked)
