"""Passes one at a time: structure after the pass, honest `modified`, analyses, pipelines."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

import sift_compiler as sift
from sift_compiler.analyses import FlopAnalysis, ShapeAnalysis
from sift_compiler.capture import capture
from sift_compiler.config import CompileConfig
from sift_compiler.errors import PassError, UserInputError
from sift_compiler.passes import (DopedLayer, FactorizedLayer, ParallelBranches, PassManager, SparseDopedPass,
                                  SparseFactorizedPass, SparseParallelPass)
from sift_compiler.passes.sparse_parallel import num_branches
from sift_compiler.sparsity import MaskedConv2d, MaskedLinear
from sift_compiler.sparsity.layers import unit_to_symmetric
from sift_compiler.unit import CompilationUnit


class Net(nn.Module):
    """stem -> conv -> conv -> head; only the two middle convs may change."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 32, 3, padding=1, stride=2)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.b(torch.relu(self.a(torch.relu(self.stem(x))))))
        return self.head(x.mean((2, 3)))


def unit_for(model, transform="parallel", sparsity=0.75, x=None):
    x = torch.randn(1, 3, 16, 16) if x is None else x
    gm = capture(model, (x,)).module
    unit = CompilationUnit(gm, (x,), config=CompileConfig(transform, sparsity), record_baseline=True)
    return unit


def call_targets(unit):
    return [str(n.target) for n in unit.graph.nodes if n.op == "call_module"]


def test_parallel_structure():
    unit = unit_for(Net())
    result = SparseParallelPass(0.75)(unit)
    assert result.modified
    targets = call_targets(unit)
    assert targets[0] == "stem" and targets[-1] == "head"
    assert [t for t in targets if t.startswith("a.")] == [f"a.branches.{j}.{part}" for j in range(4)
                                                          for part in ("layer", "norm", "act")]
    assert isinstance(unit.module.get_submodule("a"), ParallelBranches)
    assert isinstance(unit.module.get_submodule("a.branches.0.layer"), MaskedConv2d)
    assert unit.module.get_submodule("b.branches.3.layer").stride == (2, 2)
    assert all(n.meta.get("sift.origin") == "a" for n in unit.graph.nodes if str(n.target).startswith("a."))


def test_pass_without_candidates_reports_unmodified():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))  # only first and last layers
    unit = unit_for(model, x=torch.randn(1, 4))
    assert not SparseParallelPass(0.75)(unit).modified
    assert call_targets(unit) == ["0", "1", "2"]


def test_factorized_and_doped_shapes():
    unit = unit_for(Net(), "factorized")
    SparseFactorizedPass(0.75)(unit)
    layer = unit.module.get_submodule("a")
    assert isinstance(layer, FactorizedLayer)
    # h = 9*16*16 / (0.25 * (9*16 + 16)) = 57.6 -> 58
    assert layer.u.out_channels == 58 and layer.v.kernel_size == (1, 1) and layer.v.out_channels == 16
    unit = unit_for(Net(), "doped")
    SparseDopedPass(0.75)(unit)
    layer = unit.module.get_submodule("a")
    assert isinstance(layer, DopedLayer)
    # r = 0.75 * 9*16*16 / (9*16 + 16) = 10.8 -> 11; U and V stay dense
    assert layer.u.out_channels == 11 and type(layer.u) is nn.Conv2d and type(layer.v) is nn.Conv2d
    assert isinstance(layer.m, MaskedConv2d)


def test_doped_at_zero_sparsity_is_the_dense_function():
    model = Net().eval()
    x = torch.randn(2, 3, 16, 16)
    result = sift.compile(model, "doped", 0.0, (x,))
    result.module.eval()
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x))


@pytest.mark.parametrize("sparsity, branches", [(0.5, 2), (0.6, 2), (0.75, 4), (0.9, 10), (0.2, 1)])
def test_branch_count_rounding(sparsity, branches):
    assert num_branches(sparsity) == branches


def test_linear_sigma_uses_the_model_activation():
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4))
    result = sift.compile(model, "parallel", 0.5, (torch.randn(2, 8),))
    assert isinstance(result.module.get_submodule("2.branches.0.act"), nn.GELU)
    assert isinstance(result.module.get_submodule("2.branches.0.layer"), MaskedLinear)


def test_analyses_are_cached_and_invalidated():
    unit = unit_for(Net())
    shapes = unit.analyses.get(ShapeAnalysis)
    assert unit.analyses.get(ShapeAnalysis) is shapes and unit.analyses.computed["shapes"] == 1
    PassManager([SparseParallelPass(0.75)]).run(unit)  # its postcondition propagated shapes on the new graph
    assert unit.analyses.get(ShapeAnalysis) is not shapes and unit.analyses.computed["shapes"] == 2


def test_keep_dense_patterns_and_depthwise():
    class Depthwise(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
            self.pw = nn.Conv2d(16, 16, 1)
            self.keep = nn.Conv2d(16, 16, 3, padding=1)
            self.head = nn.Conv2d(16, 4, 1)

        def forward(self, x):
            return self.head(self.keep(self.pw(self.dw(self.stem(x)))))
    result = sift.compile(Depthwise(), "parallel", 0.75, (torch.randn(1, 3, 8, 8),), keep_dense=["kee*"])
    layers = {layer.name: layer for layer in result.report.layers}
    assert layers["dw"].kept_dense and "depthwise" in layers["dw"].reason
    assert layers["keep"].kept_dense and "--keep-dense" in layers["keep"].reason
    assert not layers["pw"].kept_dense and layers["pw"].transform == "parallel"


def test_unknown_pipeline_lists_known_ones():
    with pytest.raises(UserInputError, match="sparse-parallel"):
        sift.get_pipeline("sparse-sideways", CompileConfig())


def test_register_pipeline_rejects_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        sift.register_pipeline("sparse-parallel")(lambda config: [])


def test_exact_count_masks_deterministic_for_a_seed():
    x = torch.randn(1, 3, 16, 16)
    a = sift.sparsity.masks(sift.compile(Net(), "parallel", 0.75, (x,), seed=3).module)
    b = sift.sparsity.masks(sift.compile(Net(), "parallel", 0.75, (x,), seed=3).module)
    c = sift.sparsity.masks(sift.compile(Net(), "parallel", 0.75, (x,), seed=4).module)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    for mask in a.values():
        assert int(mask.sum()) == round(0.25 * mask.numel())


@pytest.mark.parametrize("transform", ["parallel", "factorized", "doped", "wide"])
def test_deferred_weights_follow_the_layer_init_on_the_mask(transform):
    """Pipelines draw new sparse weights after the masks: zero off the mask, U(-b, b) on it with
    b = 1/sqrt(fan_in) (the distribution of nn.Conv2d/nn.Linear), reproducible from the seed."""
    x, model = torch.randn(1, 3, 16, 16), Net()
    first = sift.compile(model, transform, 0.75, (x,), seed=3).module
    again = sift.compile(model, transform, 0.75, (x,), seed=3).module
    other = sift.compile(model, transform, 0.75, (x,), seed=4).module
    layers = dict(sift.sparsity.iter_masked(first))
    assert layers
    for name, layer in layers.items():
        assert not layer.init_pending
        weight, mask = layer.weight.detach(), layer.weight_mask
        bound = 1 / weight[0].numel() ** 0.5
        assert torch.all(weight[~mask] == 0)
        kept = weight[mask]
        assert torch.all(kept.abs() <= bound) and torch.count_nonzero(kept) == kept.numel()
        if kept.numel() >= 500:  # the variance of U(-b, b) is b^2 / 3
            assert kept.var().item() == pytest.approx(bound ** 2 / 3, rel=0.2)
        assert torch.equal(weight, again.get_submodule(name).weight)
        assert not torch.equal(weight, other.get_submodule(name).weight)
    sample = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(first(sample), again(sample))


def test_deferred_weights_need_init_masks_in_the_pipeline():
    unit = unit_for(Net())
    with pytest.raises(PassError, match="never initialised.*InitMasksPass"):
        PassManager([SparseParallelPass(0.75, defer_init=True), sift.passes.VerifyPass()]).run(unit)


def test_a_pass_used_alone_gives_initialised_weights():
    unit = unit_for(Net())
    SparseParallelPass(0.75)(unit)
    branch = unit.module.get_submodule("a.branches.0.layer")
    assert not branch.init_pending and torch.isfinite(branch.weight).all()
    assert branch.weight.abs().max() <= 1 / branch.weight[0].numel() ** 0.5


@given(steps=st.lists(st.integers(0, 2 ** 24 - 1), min_size=1, max_size=50),
       bound=st.floats(1e-3, 10.0))
def test_initial_weights_are_never_exactly_zero(steps, bound):
    """Draws on NumPy's float32 grid (k * 2^-24), the middle one and both ends included, map to
    non-zero values inside (-bound, bound), symmetric around 0."""
    u = np.array(steps + [2 ** 23, 0, 2 ** 24 - 1], dtype=np.float64) * 2.0 ** -24
    values = unit_to_symmetric(u.astype(np.float32), bound)
    assert np.all(values != 0) and np.all(np.abs(values) < bound * (1 + 1e-6))
    mirrored = unit_to_symmetric(((2 ** 24 - 1) * 2.0 ** -24 - u).astype(np.float32), bound)
    np.testing.assert_array_equal(mirrored, -values)
