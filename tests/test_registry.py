"""One transform registry: a transform a user registers is reachable from compile, the CLI and
the config; compile takes a CompileConfig; the config of a result survives deepcopy and save."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import sift_compiler as sift
from sift_compiler.cli.compile import build_parser, main
from sift_compiler.config import CompileConfig, config_of
from sift_compiler.errors import UserInputError
from sift_compiler.passes.base import Pass, PassResult
from sift_compiler.passes.sparse_parallel import SparseBranch, SparseParallelPass
from sift_compiler.pipelines import RewriteOptions, finish_passes, get_transform, register_pipeline, register_transform
from sift_compiler.registry import (pipeline_names, temporary_transform, transform_names, unregister_pipeline,
                                    unregister_transform)

MINE = "mine-two-branches"
pytestmark = pytest.mark.filterwarnings("ignore::sift_compiler.errors.SiftWarning")  # s' != s: by design


class MarkerPass(Pass):
    """Records that the user's pipeline ran (changes nothing)."""

    name = "mine-marker"

    def call(self, unit) -> PassResult:
        unit.notes.append("mine-marker ran")
        return PassResult(False)


def _mine_pipeline(config):
    options = RewriteOptions.of(config)
    return [MarkerPass(), SparseParallelPass(options.sparsity, defer_init=True, capacity=2.0, options=options),
            *finish_passes(config)]


@pytest.fixture(scope="module", autouse=True)
def _users_transforms():
    """A user's pipeline registered by name and two transforms, for this module only: removed after."""
    assert MINE not in pipeline_names() and MINE not in transform_names()
    register_pipeline(MINE)(_mine_pipeline)
    try:
        with temporary_transform(MINE, MINE, SparseParallelPass, "two sparse branches, always (a user's transform)",
                                 iso_flop=False), \
                temporary_transform(RENAMED, _renamed_pipeline, RenamedParallelPass,
                                    "parallel under another name (tests)"):
            yield
    finally:
        unregister_pipeline(MINE)
    assert MINE not in pipeline_names() and MINE not in transform_names() and RENAMED not in transform_names()


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


X = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))


def test_a_registered_transform_is_reachable_from_compile():
    result = sift.compile(mlp(), MINE, 0.75, (X,), output="graph")
    assert result.config.transform == MINE
    assert "mine-marker" in result.unit.history and "mine-marker ran" in result.unit.notes
    assert any(d.detail.startswith("2 branches") for d in result.unit.decisions.values())
    assert get_transform(MINE).main_pass is SparseParallelPass


def test_a_registered_transform_is_a_cli_choice_and_runs_from_the_cli(tmp_path, capsys):
    parser = build_parser()
    action = next(a for a in parser._actions if "--transform" in a.option_strings)
    assert MINE in action.choices and MINE in action.help  # choices and help come from the registry
    path = tmp_path / "model.pt"
    torch.save(mlp(), path)
    code = main([str(path), "--trust-pickle", "--input-shape", "2,8", "-t", MINE, "-s", "0.75",
                 "--report", str(tmp_path / "r.json")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert MINE in (tmp_path / "r.json").read_text()


def test_an_unknown_transform_lists_the_registered_ones():
    with pytest.raises(UserInputError, match=MINE):
        CompileConfig("sideways", 0.5)
    with pytest.raises(ValueError, match="already registered"):
        register_transform(MINE, MINE)
    with pytest.raises(UserInputError, match="unknown pipeline"):
        register_transform("mine-without-pipeline", "no-such-pipeline")
    assert "mine-without-pipeline" not in transform_names()
    with temporary_transform("mine-for-a-moment", _mine_pipeline):
        assert "mine-for-a-moment" in transform_names()
    assert "mine-for-a-moment" not in transform_names()
    unregister_transform("never-registered")  # removing what is not there is not an error


def test_compile_takes_a_compile_config():
    config = CompileConfig(transform="parallel", sparsity=0.75, seed=3)
    from_config = sift.compile(mlp(), config, (X,), output="graph")
    from_keywords = sift.compile(mlp(), "parallel", 0.75, (X,), seed=3, output="graph")
    assert from_config.config == config == from_keywords.config
    assert from_config.report.sift_flops == from_keywords.report.sift_flops
    masks = sift.sparsity.masks
    for a, b in zip(masks(from_config.module).values(), masks(from_keywords.module).values()):
        assert torch.equal(a, b)
    keyword = sift.compile(mlp(), config, example_inputs=(X,), output="graph")
    assert keyword.config == config


def test_compile_refuses_a_config_and_its_options_twice():
    with pytest.raises(UserInputError, match="seed"):
        sift.compile(mlp(), CompileConfig("parallel", 0.75), (X,), seed=1)
    with pytest.raises(UserInputError, match="seed belong in the CompileConfig"):
        sift.compile(mlp(), config=CompileConfig("parallel", 0.75), example_inputs=(X,), seed=0)


def test_compile_takes_its_options_as_dataclasses_or_their_fields():
    """Keywords are the fields of CompileConfig and CompileOptions: anything else is refused by name."""
    with pytest.raises(UserInputError, match=r"unknown options sede: .*seed.*CompileOptions \(capture_method"):
        sift.compile(mlp(), "parallel", 0.75, (X,), sede=1)
    with pytest.raises(UserInputError, match="output must be one of"):
        sift.compile(mlp(), "parallel", 0.75, (X,), output="onnx")
    options = sift.CompileOptions(output="graph", model_name="tiny-mlp")
    by_object = sift.compile(mlp(), example_inputs=(X,), config=CompileConfig("parallel", 0.75, seed=3),
                             options=options)
    by_fields = sift.compile(mlp(), "parallel", 0.75, (X,), seed=3, output="graph", model_name="tiny-mlp")
    assert isinstance(by_object.module, fx.GraphModule) and isinstance(by_fields.module, fx.GraphModule)
    assert by_object.config == by_fields.config and by_object.report.model == by_fields.report.model == "tiny-mlp"
    for a, b in zip(sift.sparsity.masks(by_object.module).values(), sift.sparsity.masks(by_fields.module).values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("output", ["graph", "native"])
def test_the_config_survives_deepcopy_and_torch_save(output, tmp_path):
    config = CompileConfig(transform="parallel", sparsity=0.75, seed=2)
    module = sift.compile(mlp(), config, (X,), output=output).module
    assert isinstance(module, fx.GraphModule) == (output == "graph")
    assert config_of(copy.deepcopy(module)) == config
    path = tmp_path / "m.pt"
    torch.save(module, path)
    assert config_of(torch.load(path, weights_only=False)) == config
    report = sift.flops(copy.deepcopy(module), (X,))
    assert report.transform == "parallel" and report.sparsity == 0.75


# ------------------------------------------------------------------ options reach passes frozen
def test_a_rewrite_pass_takes_sigma_from_its_options_not_the_global_config():
    """The pipeline's frozen options decide sigma; a bare pass has RewriteOptions' defaults and never reads
    unit.config (here asking for GELU)."""
    from sift_compiler.capture import capture
    from sift_compiler.unit import CompilationUnit

    def sigmas(options):
        """The (norm, activation) class names of every branch the pass built."""
        unit = CompilationUnit(capture(mlp(), (X,)).module, (X,),
                               config=CompileConfig("parallel", 0.75, activation="gelu"))
        SparseParallelPass(0.75, options=options)(unit)
        return {(type(m.norm).__name__, type(m.act).__name__) for m in unit.module.modules()
                if isinstance(m, SparseBranch)}
    assert sigmas(None) == {("NoneType", "ReLU")}  # a bare pass: "auto", the model's own activation
    assert sigmas(RewriteOptions(0.75, activation="relu")) == {("NoneType", "ReLU")}
    assert sigmas(RewriteOptions(0.75, activation="silu", linear_norm=True)) == {("LayerNorm", "SiLU")}


# ------------------------------------------------------------------ the registry feeds the exporters
class RenamedParallelPass(SparseParallelPass):
    """Sparse Parallel under another rule name: its branches must still get their export forms."""

    name = "renamed-parallel"


RENAMED = "renamed-parallel"


def _renamed_pipeline(config):
    options = RewriteOptions.of(config)
    return [RenamedParallelPass(options.sparsity, defer_init=True, options=options), *finish_passes(config)]


def test_a_renamed_parallel_transform_keeps_its_export_forms():
    from sift_compiler.exporters.forms import apply_form, find_parallel_groups, has_export_forms
    assert has_export_forms(RENAMED) and has_export_forms("parallel") and not has_export_forms("wide")
    assert get_transform(RENAMED).rule == "renamed-parallel"
    gm = sift.compile(mlp(), RENAMED, 0.75, (X,), output="graph").module
    groups, _ = find_parallel_groups(gm)
    assert groups and {g.rule for g in groups} == {"renamed-parallel"}
    stacked = apply_form(gm, "stacked-conv")
    assert stacked.rewritten
    with torch.no_grad():
        torch.testing.assert_close(stacked.module(X), gm(X))


def test_the_latency_search_takes_capacities_from_the_registry():
    from sift_compiler.latency import iso_flop_capacity
    assert iso_flop_capacity("wide", 0.75) == pytest.approx(2.0)            # k = sqrt(1 / (1 - s))
    assert iso_flop_capacity("parallel", 0.9) == 10.0 and get_transform("parallel").capacity.whole
    assert iso_flop_capacity("doped", 0.9) == 1.0                            # r as a multiple of its iso-FLOP r
    # a transform registered without a capacity rule cannot be searched, and the error says how to give it one
    with pytest.raises(UserInputError, match=r"mine-two-branches.*has none.*CapacityRule"):
        sift.compile(mlp(), MINE, 0.75, (X,), budget="latency", runtime="onnxruntime")
