"""The op table: one row per op, found by its target whichever capture made the graph."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import sift_compiler as sift
from sift_compiler.analyses import ops
from sift_compiler.capture import capture
from sift_compiler.sparsity import MaskedLinear


def test_every_spelling_of_add_finds_the_same_row():
    """operator.add (fx), torch.add, the Tensor method and the ATen packet share one row."""
    gm = torch.fx.symbolic_trace(nn.Identity())
    spellings = [operator.add, torch.add, "add", torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor]
    rows = []
    for target in spellings:
        node = gm.graph.create_node("call_method" if isinstance(target, str) else "call_function", target, ())
        rows.append(ops.lookup(gm, node))
    assert {row.kind for row in rows} == {"add"}
    assert len({(row.coupling, row.flops) for row in rows}) == 1
    assert ops.module_spec(MaskedLinear(2, 2)) is ops.module_spec(nn.Linear(2, 2))  # along the MRO


class EinsumBlock(nn.Module):
    """A projection by einsum with a parameter, attention scores and mixing by einsum."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(8, d)
        self.proj = nn.Parameter(torch.randn(d, 3 * d) / d ** 0.5)
        self.out = nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 8 * d), nn.Linear(8 * d, d)
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        b, t, _ = x.shape
        h = self.embed(x)
        q, k, v = torch.einsum("btd,de->bte", h, self.proj).reshape(b, t, 3, self.heads, 8).unbind(2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k).softmax(-1)
        mixed = torch.einsum("bhqk,bkhd->bqhd", scores, v).reshape(b, t, 32)
        h = h + self.out(mixed)
        return self.head(h + self.fc2(torch.relu(self.fc1(h))))


def test_einsum_flops_match_flop_counter():
    model, x = EinsumBlock().eval(), torch.randn(2, 6, 8)
    report = sift.flops(model, (x,))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    counts = {str(op): v for op, v in counter.get_flop_counts()["Global"].items()}
    linears = sum(2 * 2 * 6 * m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    projection = 2 * 2 * 6 * 32 * 96
    assert report.categories["dense"]["weight"] * 2 == pytest.approx(linears + projection)
    assert report.categories["dense"]["weight"] * 2 + report.categories["dense"]["attention"] * 2 == \
        pytest.approx(sum(counts.values()))
    assert not report.uncounted_ops


def test_an_op_without_a_flop_rule_is_listed():
    class Cumprod(nn.Module):
        def forward(self, x):
            return torch.cumprod(x, 1)
    report = sift.flops(Cumprod(), (torch.randn(2, 3),))
    assert report.uncounted_ops == ["cumprod"]
    assert "cumprod" in report.table()


def test_einsum_attention_widens_with_keep():
    """Sparse Wide: the einsum rule couples the residual stream through the parameter projection;
    attention_width='keep' keeps the per-head width."""
    torch.manual_seed(0)
    model, x = EinsumBlock(), torch.randn(2, 6, 8)
    result = sift.compile(model, "wide", 0.75, (x,))
    assert result.module.get_submodule("embed").out_features == 64
    assert result.module.proj.shape == (64, 96)      # d_model widened, 3 x heads x head_dim kept
    assert result.module(x).shape == (2, 6, 5)
    assert abs(result.report.flop_ratio - 1) < 0.005
    assert not [n for n in result.report.notes if "no coupling rule" in n]


def test_unknown_ops_are_named_in_the_graph_they_come_from():
    gm = capture(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (torch.randn(1, 4),)).module
    kinds = [ops.op_kind(gm, n) for n in gm.graph.nodes if n.op == "call_module"]
    assert kinds == ["linear", "relu"]
