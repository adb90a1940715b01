"""The support matrix's checks (tests/checks.py) can fail: each passes on a good compile of a tiny
GPT-2 and fails, naming what broke, on the same compile broken in one place (ONNX: on a module
whose Python state the exporter bakes in)."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import sift_compiler as sift
from sift_compiler.sparsity.layers import iter_masked
from checks import (assert_generate_equals_recompute, assert_iso_flop, assert_native_equals_graph,
                    assert_onnx_matches, assert_rigl_keeps_exact_counts, greedy_decodes)
from families import FAMILIES
from model_zoo import Case


@pytest.fixture
def compiled():
    case = FAMILIES["gpt2"].build()
    return case, sift.compile(case.model, "parallel", 0.5, case.args, case.kwargs)


def _one_extra_nonzero(module: torch.nn.Module) -> str:
    """Set one masked-off entry of the first masked layer (mask and weight): one non-zero too many."""
    name, layer = next((n, m) for n, m in iter_masked(module) if m.target_density < 1)
    index = tuple(int(i) for i in (~layer.weight_mask).nonzero()[0])
    with torch.no_grad():
        layer.weight_mask[index] = True
        layer.weight[index] = 0.5
    return name


def test_iso_flop_check_recounts_the_masks(compiled):
    _, result = compiled
    assert assert_iso_flop(result) == pytest.approx(1, abs=5e-3)
    _one_extra_nonzero(result.module)
    with pytest.raises(AssertionError, match="the masks give sift/dense = .* a mask changed after compile"):
        assert_iso_flop(result)


def test_iso_flop_check_fails_on_a_layer_left_dense(compiled):
    """Every weight of one masked layer switched on: far more FLOPs than mask rounding explains."""
    _, result = compiled
    _, layer = next((n, m) for n, m in iter_masked(result.module) if m.target_density < 1)
    with torch.no_grad():
        layer.weight_mask.fill_(True)
    with pytest.raises(AssertionError, match=r"not iso-FLOP: sift/dense = 1\.\d+, more than the"):
        assert_iso_flop(result)


def test_native_equals_graph_check_fails_when_the_native_model_drifts(compiled):
    case, result = compiled
    assert_native_equals_graph(result, case)
    drifted = copy.deepcopy(result.module)  # its own weights: the graph form keeps the compiled ones
    _, layer = next(iter_masked(drifted))
    with torch.no_grad():
        layer.weight.mul_(1.5)
    with pytest.raises(AssertionError, match="native model and graph form differ at batch \\+ 2"):
        assert_native_equals_graph(dataclasses.replace(result, module=drifted), case)


def test_generate_check_fails_when_generate_decodes_otherwise(compiled):
    """A generation config that bans the token the greedy decode picks first: generate() must differ."""
    case, result = compiled
    model = result.module.eval()
    assert_generate_equals_recompute(model, "causal", case.kwargs)
    _, recomputed = greedy_decodes(model, "causal", case.kwargs)
    model.generation_config.bad_words_ids = [[int(recomputed[0, 5])]]
    with pytest.raises(AssertionError, match=r"generate\(\) with the cache decoded .*, a full recompute"):
        assert_generate_equals_recompute(model, "causal", case.kwargs)


def test_rigl_check_passes_and_fails_on_one_extra_nonzero(compiled):
    case, result = compiled
    planned = copy.deepcopy(result.module)
    assert_rigl_keeps_exact_counts(result.module, case)
    name = _one_extra_nonzero(planned)
    with pytest.raises(AssertionError, match=f"before RigL 1 masked layers miss their planned count .*{name}"):
        assert_rigl_keeps_exact_counts(planned, case)


class _CountsItsCalls(torch.nn.Module):
    """Scales by how often it was called: Python state the exporter bakes in as the count at trace time."""

    def __init__(self) -> None:
        super().__init__()
        self.layer, self.calls = torch.nn.Linear(4, 4), 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.layer(x) * self.calls


def test_onnx_check_fails_when_onnxruntime_computes_otherwise(tmp_path):
    torch.manual_seed(0)
    case = Case(_CountsItsCalls(), (torch.randn(2, 4),), {})
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        assert_onnx_matches(case.model, case, str(tmp_path / "model.onnx"))
    assert_onnx_matches(torch.nn.Linear(4, 4), case, str(tmp_path / "linear.onnx"))
