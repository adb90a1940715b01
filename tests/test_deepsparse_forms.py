"""The forms DeepSparse users get are exact on DeepSparse, on many shapes, the bug's ones included.

Every case exports a Sparse Parallel graph in ``stacked-conv`` (what shared cores and ``auto``'s
fallback use) or in the default ``auto`` (ReLU/GELU branches as they are, linear sums stacked) and requires the exporter's own
verification to pass: onnxruntime against torch, DeepSparse against onnxruntime (1e-4 here, far
below the bug's errors of order 1), every op supported, and no fallback to another form.
"""
from __future__ import annotations

import tempfile
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sift_compiler.capture.tracer import symbolic_trace
from sift_compiler.exporters.forms import DEFAULT_FORM
from sift_compiler.exporters.onnx import export_onnx
from sift_compiler.passes.graph_edit import finish_edits, splice_module
from sift_compiler.unit import CompilationUnit
from test_export_forms import make_branches, parallel_graph

pytestmark = pytest.mark.deepsparse


FORMS_IN_USE = ["stacked-conv", DEFAULT_FORM]


def assert_exact_on_deepsparse(gm, x, form: str = DEFAULT_FORM, min_ops: float = 1.0) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        info = export_onnx(gm, (x,), f"{tmp}/model.onnx", form=form, deepsparse="require", strict=False, rtol=1e-4,
                           min_supported_ops=min_ops)
    assert info.form == form and not any("DeepSparse disagreed" in n for n in info.notes), info.notes
    assert info.verification.ok, info.verification.table()


# The cases of the bug report: B >= 9 convs of one input, B = 4 at 256 channels, 14 x 14.
@pytest.mark.parametrize("branches, channels, act", [
    (10, 64, "identity"), (9, 64, "identity"), (4, 256, "identity"), (16, 32, "identity"),
    (10, 64, "relu"), (9, 64, "relu"), (4, 256, "relu"), (10, 256, "relu"), (16, 32, "relu")],
    ids=["B10-c64", "B9-c64", "B4-c256", "B16-c32", "B10-c64-relu", "B9-c64-relu", "B4-c256-relu", "B10-c256-relu",
         "B16-c32-relu"])
@pytest.mark.parametrize("form", FORMS_IN_USE)
def test_known_bad_shapes_are_exact(branches, channels, act, form):
    dense = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    gm = parallel_graph(dense, make_branches(dense, branches, act, norm=True, seed=branches))
    assert_exact_on_deepsparse(gm, torch.randn(2, channels, 14, 14), form)


@settings(max_examples=14, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(branches=st.sampled_from([2, 3, 4, 5, 8, 9, 10, 12]), c_in=st.sampled_from([8, 16, 64, 128]),
       c_out=st.sampled_from([16, 64, 256]), size=st.sampled_from([7, 14]), kernel=st.sampled_from([1, 3]),
       stride=st.sampled_from([1, 2]), act=st.sampled_from(["relu", "identity"]), batch=st.integers(1, 3),
       seed=st.integers(0, 100), form=st.sampled_from(FORMS_IN_USE))
def test_forms_are_exact_on_deepsparse(branches, c_in, c_out, size, kernel, stride, act, batch, seed, form):
    dense = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)
    gm = parallel_graph(dense, make_branches(dense, branches, act, norm=True, seed=seed))
    x = torch.randn(batch, c_in, size, size, generator=torch.Generator().manual_seed(seed))
    assert_exact_on_deepsparse(gm, x, form)


class BasicBlock(nn.Module):
    """ResNet's identity-shortcut basic block."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)


@pytest.mark.parametrize("branches", [3, 4])
@pytest.mark.parametrize("act", ["identity", "relu"])
@pytest.mark.parametrize("form", FORMS_IN_USE)
def test_basic_block_with_parallel_convs_is_exact(branches, act, form):
    """The issue's third bad case: both 3x3 convs of a basic block as sums of 3 or 4 branches, then BN."""
    block = BasicBlock(64).eval()
    gm = symbolic_trace(block)
    unit = CompilationUnit(gm)
    for name in ("conv1", "conv2"):
        node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == name)
        splice_module(unit, node, make_branches(block.get_submodule(name), branches, act, norm=True, seed=7),
                      name, {"sift.origin": name, "sift.rule": "sparse-parallel"})
    finish_edits(unit)
    for bn in (block.bn1, block.bn2):
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(-1.0, 1.0)
    assert_exact_on_deepsparse(gm.eval(), torch.randn(2, 64, 14, 14), form)


@pytest.mark.parametrize("form", FORMS_IN_USE)
@pytest.mark.parametrize("layer_norm", [False, True], ids=["gelu", "layernorm-gelu"])
def test_linear_parallel_branches_are_exact_on_deepsparse(form, layer_norm):
    """Transformer MLP shape: Linear branches with GELU (and --linear-norm's LayerNorm) on (batch, tokens, features)."""
    dense = nn.Linear(64, 128)
    branches = make_branches(dense, 4, "gelu", norm=False, seed=3)
    if layer_norm:
        for branch in branches.branches:
            branch.norm = nn.LayerNorm(128)
            branch.norm.weight.data.uniform_(-1.0, 1.0)
    gm = parallel_graph(dense, branches)
    # DeepSparse 1.8 leaves LayerNormalization to its bundled onnxruntime (88-92% of ops supported)
    assert_exact_on_deepsparse(gm, torch.randn(2, 16, 64), form, min_ops=0.85 if layer_norm else 1.0)


def test_default_form_supports_every_op_on_deepsparse_in_a_compiled_net():
    import sift_compiler as sift
    net = nn.Sequential(OrderedDict(
        stem=nn.Conv2d(3, 16, 3, padding=1), act=nn.ReLU(), mid=nn.Conv2d(16, 32, 3, padding=1, stride=2),
        bn=nn.BatchNorm2d(32), act2=nn.ReLU(), pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(),
        head=nn.Linear(32, 10)))
    x = torch.randn(2, 3, 16, 16)
    result = sift.compile(net, "parallel", 0.9, (x,))
    assert_exact_on_deepsparse(result.module, x)
