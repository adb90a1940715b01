"""A fifth transform is one pass plus one registration: defined in this file alone, registered, and
reached from compile, the CLI, save/load, the ONNX export and the iso-latency search; the
registration is removed when the tests are done (the global registry is left as it was found)."""
from __future__ import annotations

from typing import List, Tuple

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import sift_compiler as sift
from sift_compiler.cli.compile import build_parser, main
from sift_compiler.latency import LatencyBudget, iso_flop_capacity
from sift_compiler.passes.rewrite import LayerRewritePass, RewriteOptions
from sift_compiler.pipelines import finish_passes
from sift_compiler.registry import (CapacityRule, get_transform, register_transform, transform_names,
                                    unregister_transform)
from sift_compiler.sparsity.layers import MaskedLayer, iter_masked, new_layer

NAME = "sum"


class SparseSum(nn.Module):
    """sum_j W_j x: C sparse copies of one layer summed (Sparse Parallel without sigma)."""

    sift_rule = "sparse-sum"    # sift's own module: swapped in whole in the native model, its nodes keep the rule
    traced_by_structure = True  # its forward depends on the copy count only (graph_edit)

    def __init__(self, copies: List[nn.Module]) -> None:
        super().__init__()
        self.copies = nn.ModuleList(copies)

    def forward(self, x):
        out = self.copies[0](x)
        for layer in self.copies[1:]:
            out = out + layer(x)
        return out


def copies_for(sparsity: float) -> int:
    return max(1, int(round(1.0 / (1.0 - sparsity))))


class SparseSumPass(LayerRewritePass):
    """Replace every transformable Linear/Conv with C summed sparse copies (C = round(1/(1-s)))."""

    name = "sparse-sum"
    transform = NAME

    def build(self, unit, layer, module) -> Tuple[nn.Module, str]:
        count = copies_for(self.sparsity) if self.capacity is None else max(1, int(round(self.capacity)))
        return SparseSum([new_layer(module) for _ in range(count)]).train(module.training), f"{count} copies"


def sum_pipeline(config) -> list:
    options = RewriteOptions.of(config)
    return [SparseSumPass(options.sparsity, defer_init=True, capacity=options.capacity, options=options),
            *finish_passes(config)]


@pytest.fixture(scope="module", autouse=True)
def registered():
    assert NAME not in transform_names()
    register_transform(NAME, sum_pipeline, SparseSumPass, "C sparse copies summed (a test's fifth transform)",
                       capacity=CapacityRule(lambda s: float(copies_for(s)), whole=True, smallest=1.0))
    yield
    unregister_transform(NAME)
    assert NAME not in transform_names()


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 4))


X = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))


def test_compile_makes_it_iso_flop_in_the_users_class():
    result = sift.compile(mlp(), NAME, 0.75, (X,))
    assert result.output == "native" and type(result.module) is nn.Sequential
    assert [type(m) for m in result.module][2:5:2] == [SparseSum, SparseSum]    # the middle layers, 4 copies each
    assert all(len(m.copies) == 4 for m in result.module if isinstance(m, SparseSum))
    assert result.report.flop_ratio == pytest.approx(1.0, abs=0.01)              # compensated to iso-FLOP
    assert get_transform(NAME).rule == "sparse-sum"
    assert {n.meta.get("sift.rule") for n in result.graph_module.graph.nodes} >= {"sparse-sum"}
    with torch.no_grad():
        torch.testing.assert_close(result.module(X), result.graph_module(X))


def test_the_cli_offers_and_runs_it(tmp_path, capsys):
    action = next(a for a in build_parser()._actions if "--transform" in a.option_strings)
    assert NAME in action.choices and "C sparse copies summed" in action.help
    path = tmp_path / "model.pt"
    torch.save(mlp(), path)
    code = main([str(path), "--trust-pickle", "--input-shape", "2,8", "-t", NAME, "-s", "0.75",
                 "--report", str(tmp_path / "r.json"), "-o", str(tmp_path / "m.sift.pt")])
    assert code == 0, capsys.readouterr().err
    assert f'"transform": "{NAME}"' in (tmp_path / "r.json").read_text()
    loaded = sift.load(str(tmp_path / "m.sift.pt"), model=mlp())
    assert loaded.config.transform == NAME


def test_save_and_load_give_the_same_model(tmp_path):
    result = sift.compile(mlp(), NAME, 0.75, (X,), seed=3)
    path = str(tmp_path / "m.sift.pt")
    result.save(path)
    loaded = sift.load(path, model=mlp())
    assert loaded.config == result.config and type(loaded.module) is nn.Sequential
    for (name, a), (_, b) in zip(iter_masked(result.module), iter_masked(loaded.module)):
        assert torch.equal(a.weight_mask, b.weight_mask) and torch.equal(a.weight, b.weight), name
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(X), result.module(X))


def test_the_onnx_export_matches_torch(tmp_path):
    result = sift.compile(mlp(), NAME, 0.75, (X,), output="graph")
    assert isinstance(result.module, fx.GraphModule)
    path = str(tmp_path / "m.onnx")
    info = sift.export_onnx(result.module, (X,), path, deepsparse="skip")
    assert info.verification.ok
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: X.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(out, result.module(X).numpy(), rtol=1e-5, atol=1e-6)
    zeros = sum(int((~m.weight_mask).sum()) for _, m in iter_masked(result.module))
    assert zeros > 0 and all(isinstance(m, MaskedLayer) for _, m in iter_masked(result.module))


def test_the_latency_search_takes_its_capacity_rule():
    assert iso_flop_capacity(NAME, 0.75) == 4.0
    budget = LatencyBudget(batch_size=2, ratio=1000.0, rounds=1, iterations=1, max_steps=2, max_capacity=3)
    result = sift.compile(mlp(), NAME, 0.75, (X,), budget="latency", runtime="onnxruntime", latency=budget)
    search = result.latency
    # every capacity meets a 1000x budget, so the search grows from the rule's smallest (1) to its cap (3)
    assert [p.capacity for p in search.probes] == [1.0, 3.0] and search.capacity == 3.0
    assert result.config.capacity == 3.0 and result.config.transform == NAME
    assert all(len(m.copies) == 3 for m in result.module.modules() if isinstance(m, SparseSum))
