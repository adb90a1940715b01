"""Export forms compute what the trained Sparse Parallel graph computes, on many shapes.

Graphs are built the way SparseParallelPass builds them (`splice_module` of a `ParallelBranches`
into a traced model), so the rewrite sees real provenance metadata. Runtime checks of the forms
(DeepSparse against onnxruntime) are in test_deepsparse_forms.py.
"""
from __future__ import annotations

import operator
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sift_compiler.capture.tracer import symbolic_trace
from sift_compiler.errors import UserInputError
from sift_compiler.exporters.forms import FORMS, SAFE_FORM, StackedBranches, apply_form, find_parallel_groups
from sift_compiler.passes.graph_edit import finish_edits, splice_module
from sift_compiler.passes.sparse_parallel import ParallelBranches, SparseBranch
from sift_compiler.sparsity.init import layer_generator, random_mask
from sift_compiler.sparsity.layers import MaskedLayer, new_layer
from sift_compiler.unit import CompilationUnit

STACKED = [f for f in FORMS if f not in ("branches", "auto")]
ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "identity": nn.Identity}


def _randomize_norm(norm: nn.Module, gen: torch.Generator) -> None:
    """Trained-looking BatchNorm: statistics and affine parameters far from their init (negative scales too)."""
    with torch.no_grad():
        norm.running_mean.copy_(torch.randn(norm.num_features, generator=gen))
        norm.running_var.copy_(torch.rand(norm.num_features, generator=gen) * 2 + 0.1)
        norm.weight.copy_(torch.randn(norm.num_features, generator=gen))
        norm.bias.copy_(torch.randn(norm.num_features, generator=gen))


def make_branches(layer: nn.Module, count: int, act: str, norm: bool, seed: int = 0) -> ParallelBranches:
    """B masked copies of ``layer`` at density 1/B, each with an optional BatchNorm and ``act``."""
    gen = torch.Generator().manual_seed(seed)
    branches = []
    for j in range(count):
        sparse = new_layer(layer)
        sparse.target_density = 1.0 / count
        sparse.set_mask(random_mask(tuple(sparse.weight.shape), 1.0 / count, layer_generator(seed, f"branch{j}")))
        bn = None
        if norm:
            width = sparse.out_channels
            bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[len(sparse.kernel_size)](width)
            _randomize_norm(bn, gen)
        branches.append(SparseBranch(sparse, bn, ACTS[act]()))
    return ParallelBranches(branches).eval()


def parallel_graph(layer: nn.Module, branches: ParallelBranches, calls: int = 1):
    """A traced model ``x -> layer (x calls)`` with ``layer`` spliced as the pass splices it."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = layer

        def forward(self, x):
            for _ in range(calls):
                x = self.p(x)
            return x

    gm = symbolic_trace(Model())
    unit = CompilationUnit(gm)
    meta = {"sift.origin": "p", "sift.rule": "sparse-parallel"}
    for node in [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "p"]:
        splice_module(unit, node, branches, "p", meta)
    finish_edits(unit)
    return gm.eval()


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    scale = float(b.abs().max()) or 1.0
    assert a.shape == b.shape
    assert float((a - b).abs().max()) <= 2e-5 * scale, f"max error {float((a - b).abs().max())} at scale {scale}"


def assert_stacked(gm, count: int) -> None:
    """The rewritten graph has one stacked call per call site and no branch nodes or Adds left."""
    calls = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert [n.target for n in calls] == ["p.stacked"] * count
    assert not any(n.op == "call_function" and n.target is operator.add for n in gm.graph.nodes)
    assert isinstance(gm.get_submodule("p.stacked"), StackedBranches)


conv_cases = st.fixed_dictionaries({
    "dims": st.sampled_from([1, 2, 2, 2, 3]),
    "branches": st.sampled_from([2, 3, 4, 9, 10]),
    "groups": st.sampled_from([1, 1, 2]),
    "c_in": st.integers(1, 4), "c_out": st.integers(1, 4),
    "kernel": st.sampled_from([1, 2, 3]), "stride": st.sampled_from([1, 2]),
    "padding": st.sampled_from([0, 1]), "dilation": st.sampled_from([1, 2]),
    "bias": st.booleans(), "norm": st.booleans(), "act": st.sampled_from(list(ACTS)),
    "form": st.sampled_from(STACKED), "batch": st.integers(1, 3), "seed": st.integers(0, 1000),
})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=conv_cases)
def test_conv_forms_compute_the_branches(case):
    """Every stacked form equals the branch graph for 1-d/2-d/3-d, grouped, strided, dilated convs."""
    groups = case["groups"]
    if groups > 1 and case["form"] != "stacked-conv":
        case["form"] = "stacked-conv"  # grouped convs stack only as stacked-conv (tested separately below)
    conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[case["dims"]]
    dense = conv_cls(case["c_in"] * groups, case["c_out"] * groups, case["kernel"], stride=case["stride"],
                     padding=case["padding"], dilation=case["dilation"], groups=groups, bias=case["bias"])
    gm = parallel_graph(dense, make_branches(dense, case["branches"], case["act"], case["norm"], case["seed"]))
    size = (case["kernel"] - 1) * case["dilation"] + 3
    x = torch.randn(case["batch"], case["c_in"] * groups, *[size + 2] * case["dims"],
                    generator=torch.Generator().manual_seed(case["seed"]))
    result = apply_form(gm, case["form"])
    assert result.rewritten == [f"p: {case['branches']} branches -> {case['form']}"], result.notes
    assert_stacked(result.module, 1)
    with torch.no_grad():
        assert_same(result.module(x), gm(x))


linear_cases = st.fixed_dictionaries({
    "branches": st.sampled_from([2, 3, 4, 10]), "d_in": st.integers(1, 12), "d_out": st.integers(1, 12),
    "bias": st.booleans(), "act": st.sampled_from(list(ACTS)), "form": st.sampled_from(STACKED),
    "lead": st.sampled_from([(2,), (1, 5), (2, 3)]), "seed": st.integers(0, 1000),
})


@settings(max_examples=30, deadline=None)
@given(case=linear_cases)
def test_linear_forms_compute_the_branches(case):
    """Linear branches (transformer MLPs) on 2-d and 3-d inputs, every activation and form."""
    dense = nn.Linear(case["d_in"], case["d_out"], bias=case["bias"])
    gm = parallel_graph(dense, make_branches(dense, case["branches"], case["act"], norm=False, seed=case["seed"]))
    x = torch.randn(*case["lead"], case["d_in"], generator=torch.Generator().manual_seed(case["seed"]))
    result = apply_form(gm, case["form"])
    assert_stacked(result.module, 1)
    with torch.no_grad():
        assert_same(result.module(x), gm(x))


def test_grouped_conv_refuses_forms_that_need_branch_major_channels():
    dense = nn.Conv2d(4, 4, 3, padding=1, groups=2)
    gm = parallel_graph(dense, make_branches(dense, 3, "relu", norm=True))
    result = apply_form(gm, "stacked-add")
    assert result.rewritten == []
    assert result.notes == ["p: grouped convs stack only as stacked-conv, not stacked-add; kept as branches"]
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        assert_same(result.module(x), gm(x))


def test_stacked_layer_carries_every_branch_mask():
    dense = nn.Conv2d(3, 5, 3)
    branches = make_branches(dense, 4, "relu", norm=True)
    gm = parallel_graph(dense, branches)
    stacked = apply_form(gm, "stacked-conv").module.get_submodule("p.stacked").layer
    assert isinstance(stacked, MaskedLayer)
    assert stacked.weight.shape == (20, 3, 3, 3)
    assert int(stacked.weight_mask.sum()) == sum(int(b.layer.weight_mask.sum()) for b in branches.branches)
    assert stacked.mask_parts == 4 and stacked.target_density == pytest.approx(0.25)
    # branch-major: rows 5..9 are branch 1's mask
    assert torch.equal(stacked.weight_mask[5:10], branches.branches[1].layer.weight_mask)


def test_every_call_site_of_a_shared_layer_is_rewritten_once():
    """A layer called twice becomes two calls of ONE stacked module (weights stay shared)."""
    dense = nn.Conv2d(4, 4, 3, padding=1)
    gm = parallel_graph(dense, make_branches(dense, 3, "relu", norm=True), calls=2)
    assert len(find_parallel_groups(gm)[0]) == 2
    result = apply_form(gm, "stacked-conv")
    assert_stacked(result.module, 2)
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        assert_same(result.module(x), gm(x))


@pytest.mark.parametrize("why, dense, build", [
    ("branches use different activations", nn.Linear(3, 4),
     lambda d: ParallelBranches([SparseBranch(new_layer(d), None, nn.ReLU()), SparseBranch(new_layer(d), None, nn.GELU())])),
    ("branch norm GroupNorm is neither a per-channel BatchNorm with running stats nor a LayerNorm after a Linear",
     nn.Conv2d(3, 4, 1), lambda d: ParallelBranches([SparseBranch(new_layer(d), nn.GroupNorm(2, 4), nn.ReLU())
                                                      for _ in range(2)])),
], ids=["mixed-activations", "groupnorm"])
def test_groups_that_cannot_stack_stay_branches_with_a_reason(why, dense, build):
    gm = parallel_graph(dense, build(dense).eval())
    result = apply_form(gm, "stacked-conv")
    assert result.rewritten == [] and result.notes == [f"p: {why}; kept as branches"]
    x = torch.randn(2, 3) if isinstance(dense, nn.Linear) else torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        assert_same(result.module(x), gm(x))


@pytest.mark.parametrize("form", STACKED)
@pytest.mark.parametrize("lead", [(2,), (2, 5)])
def test_linear_branches_with_layernorm_stack(form, lead):
    """sift-compile --linear-norm: Linear -> LayerNorm -> GELU branches, each LayerNorm on its own slice."""
    dense = nn.Linear(6, 4)
    branches = make_branches(dense, 3, "gelu", norm=False, seed=5)
    gen = torch.Generator().manual_seed(5)
    for branch in branches.branches:
        branch.norm = nn.LayerNorm(4)
        branch.norm.weight.data.copy_(torch.randn(4, generator=gen))
        branch.norm.bias.data.copy_(torch.randn(4, generator=gen))
    gm = parallel_graph(dense, branches)
    result = apply_form(gm, form)
    assert_stacked(result.module, 1)
    x = torch.randn(*lead, 6)
    with torch.no_grad():
        assert_same(result.module(x), gm(x))


@pytest.mark.parametrize("act, kept", [("relu", True), ("gelu", True), ("identity", False)])
def test_auto_keeps_activated_branches_and_stacks_linear_sums(act, kept):
    dense = nn.Conv2d(3, 4, 3, padding=1)
    gm = parallel_graph(dense, make_branches(dense, 10, act, norm=True))
    result = apply_form(gm, "auto")
    assert result.branch_groups == (["p"] if kept else [])
    assert result.rewritten == ([] if kept else [f"p: 10 branches -> {SAFE_FORM}"])
    if not kept:
        assert_stacked(result.module, 1)
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        assert_same(result.module(x), gm(x))


def test_unknown_form_is_a_user_error():
    gm = parallel_graph(nn.Linear(2, 2), make_branches(nn.Linear(2, 2), 2, "relu", norm=False))
    with pytest.raises(UserInputError, match="unknown export form .wide-conv.: choose one of auto, branches"):
        apply_form(gm, "wide-conv")


def test_compiled_model_rewrites_every_parallel_layer():
    """On a real compiled model (the pass's own graph), every Sparse Parallel layer is stacked."""
    import sift_compiler as sift
    net = nn.Sequential(OrderedDict(
        stem=nn.Conv2d(3, 8, 3, padding=1), act=nn.ReLU(), mid=nn.Conv2d(8, 8, 3, padding=1),
        bn=nn.BatchNorm2d(8), act2=nn.ReLU(), mid2=nn.Conv2d(8, 8, 3, padding=1), act3=nn.ReLU(),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), head=nn.Linear(8, 10)))
    x = torch.randn(2, 3, 12, 12)
    result = sift.compile(net, "parallel", 0.9, (x,))
    module = result.graph_module.eval()
    formed = apply_form(module, "stacked-conv")
    assert sorted(formed.rewritten) == ["mid2: 10 branches -> stacked-conv", "mid: 10 branches -> stacked-conv"]
    with torch.no_grad():
        assert_same(formed.module(x), module(x))
    assert sorted(apply_form(module, "auto").branch_groups) == ["mid", "mid2"]  # ReLU branches: kept
