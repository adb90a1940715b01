"""The pass contract enforces itself: honest ``modified``, stale analyses stay stale, mask edits
bump the generation, errors name their pass, and an iso-FLOP miss is a postcondition error."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sift_compiler as sift
from sift_compiler.analyses import FlopAnalysis
from sift_compiler.config import CompileConfig
from sift_compiler.errors import PassError, PostconditionError, PreconditionError, UserInputError, at_node
from sift_compiler.passes import PassManager
from sift_compiler.passes.base import Pass, PassResult
from sift_compiler.passes.sparse_parallel import SparseParallelPass
from sift_compiler.passes.sparse_wide import SparseWidePass
from sift_compiler.pipelines import finish_passes
from sift_compiler.registry import temporary_transform
from sift_compiler.sparsity.layers import iter_masked
from sift_compiler.unit import CompilationUnit, RewriteLog


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.conv(F.relu(self.stem(x))))
        return self.head(x.mean((2, 3)))


def example() -> torch.Tensor:
    return torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def compiled_unit(transform: str = "parallel") -> CompilationUnit:
    torch.manual_seed(0)
    return sift.compile(SmallCNN(), transform, 0.75, (example(),), output="graph").unit


def first_masked(unit: CompilationUnit):
    return next(layer for _, layer in iter_masked(unit.module))


# ------------------------------------------------------------------ honest `modified`
class LiarPass(Pass):
    """Edits the unit and says it did not."""

    name = "liar"

    def call(self, unit) -> PassResult:
        unit.touch()
        return PassResult(False)


class SilentMaskEditPass(Pass):
    """Flips one mask entry in place without calling touch(), and says it changed nothing."""

    name = "silent-mask-edit"

    def call(self, unit) -> PassResult:
        mask = first_masked(unit).weight_mask
        with torch.no_grad():
            mask.view(-1)[0] = ~mask.view(-1)[0]
        return PassResult(False)


@pytest.mark.parametrize("liar", [LiarPass, SilentMaskEditPass])
def test_a_pass_that_lies_about_modified_is_a_pass_error_naming_it(liar):
    unit = compiled_unit()
    with pytest.raises(PassError, match=rf"\[{liar.name}\].*modified=False"):
        PassManager([liar()]).run(unit)


class HonestNoop(Pass):
    name = "honest-noop"

    def call(self, unit) -> PassResult:
        return PassResult(False)


def test_an_honest_unmodified_pass_keeps_current_analyses():
    unit = compiled_unit()
    counts = unit.analyses.get(FlopAnalysis)
    PassManager([HonestNoop()]).run(unit)
    assert unit.analyses.is_current(FlopAnalysis)
    assert unit.analyses.get(FlopAnalysis) is counts


# ------------------------------------------------------------------ stale results stay stale
def test_a_stale_analysis_is_not_restamped_by_a_pass_that_preserves_it():
    unit = compiled_unit()
    stale = unit.analyses.get(FlopAnalysis)
    unit.touch()                               # an edit before the pass: the cached result is stale now
    PassManager([HonestNoop()]).run(unit)      # preserves everything; must not bless the stale result
    assert not unit.analyses.is_current(FlopAnalysis)
    assert unit.analyses.get(FlopAnalysis) is not stale


def test_invalidate_restamps_only_results_of_the_start_generation():
    unit = compiled_unit()
    start = unit.generation
    current = unit.analyses.get(FlopAnalysis)
    unit.touch()
    unit.analyses.invalidate(frozenset({FlopAnalysis}), start_generation=start)
    assert unit.analyses.get(FlopAnalysis) is current  # computed at the start: preserved, re-stamped
    old = unit.generation
    unit.touch()
    unit.analyses.invalidate(frozenset({FlopAnalysis}), start_generation=unit.generation)
    assert not unit.analyses.is_current(FlopAnalysis)  # computed at ``old``, before the pass began
    assert old != unit.generation


# ------------------------------------------------------------------ mask edits bump the generation
def test_set_mask_bumps_the_generation_and_the_flops_are_recomputed():
    unit = compiled_unit()
    before = unit.analyses.get(FlopAnalysis)
    generation = unit.generation
    layer = first_masked(unit)
    layer.set_mask(torch.zeros_like(layer.weight_mask))
    assert unit.generation > generation
    after = unit.analyses.get(FlopAnalysis)
    assert after is not before and after.weight_effective < before.weight_effective


def test_install_mask_bumps_the_generation():
    unit = compiled_unit()
    before = unit.analyses.get(FlopAnalysis)
    generation = unit.generation
    layer = first_masked(unit)
    layer.install_mask(torch.ones_like(layer.weight_mask))  # a new tensor: its identity changes
    assert unit.generation > generation
    assert unit.analyses.get(FlopAnalysis).weight_effective > before.weight_effective


def test_load_state_dict_bumps_the_generation():
    unit = compiled_unit()
    before = unit.analyses.get(FlopAnalysis)
    generation = unit.generation
    state = unit.module.state_dict()
    name = next(k for k in state if k.endswith("weight_mask"))
    state[name] = torch.zeros_like(state[name])
    unit.module.load_state_dict(state)
    assert unit.generation > generation
    assert unit.analyses.get(FlopAnalysis).weight_effective < before.weight_effective


def test_a_mask_engine_update_bumps_the_generation():
    unit = compiled_unit()
    module = unit.module
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    engine = sift.sparsity.SET(module, optimizer, total_steps=8, update_interval=2)
    generation = unit.generation
    before = unit.analyses.get(FlopAnalysis)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):  # step 2 is an update step
        x, y = torch.randn(4, 1, 8, 8, generator=gen), torch.randint(0, 10, (4,), generator=gen)
        F.cross_entropy(module(x), y).backward()
        optimizer.step()
        engine.step()
        optimizer.zero_grad()
    assert engine.history and engine.history[-1]["replaced"] > 0
    assert unit.generation > generation
    assert unit.analyses.get(FlopAnalysis) is not before
    engine.remove()


def test_reading_the_generation_without_edits_keeps_it():
    """Forwards and mask reads are not edits: the generation and the cached analyses stay; one real
    mask edit then moves it by one (so a generation that never moved would fail here)."""
    unit = compiled_unit()
    first, flops = unit.generation, unit.analyses.get(FlopAnalysis)
    computed = dict(unit.analyses.computed)
    with torch.no_grad():
        unit.module(example())
        masks = [m.weight_mask.sum() for _, m in iter_masked(unit.module)]
    assert masks and unit.generation == first
    assert unit.analyses.get(FlopAnalysis) is flops and unit.analyses.computed == computed
    with torch.no_grad():
        mask = first_masked(unit).weight_mask
        mask.view(-1)[0] = ~mask.view(-1)[0]
    assert unit.generation == first + 1 and unit.analyses.get(FlopAnalysis) is not flops


# ------------------------------------------------------------------ errors name their pass
class RaisesUserInput(Pass):
    name = "raises-user-input"

    def call(self, unit) -> PassResult:
        raise UserInputError("this knob is out of range")


class RaisesAtNode(Pass):
    """Fails while working on the 'conv' call, as a rewrite does when a layer cannot be rebuilt."""

    name = "raises-at-node"

    def call(self, unit) -> PassResult:
        node = next(n for n in unit.graph.nodes if n.op == "call_module" and "conv" in str(n.target))
        try:
            raise RuntimeError("cannot rebuild this layer")
        except RuntimeError as e:
            raise at_node(e, node)


def test_a_sift_error_inside_a_pass_keeps_its_class_and_names_the_pass_and_history():
    unit = compiled_unit()
    with pytest.raises(UserInputError) as info:  # still the class the pass raised
        PassManager([HonestNoop(), RaisesUserInput()]).run(unit)
    message = str(info.value)
    assert "[raises-user-input]" in message and "this knob is out of range" in message
    assert "honest-noop" in message and "verify" in message  # the passes before it, compile's included
    assert info.value.pass_name == "raises-user-input"
    assert info.value.pass_history[-1] == "honest-noop"


def test_an_error_at_a_node_names_the_node_and_its_source_line():
    unit = compiled_unit()
    with pytest.raises(PassError) as info:
        PassManager([RaisesAtNode()]).run(unit)
    message = str(info.value)
    assert "[raises-at-node]" in message and "cannot rebuild this layer" in message
    assert "'conv" in message and "test_pass_contract.py" in message  # the user's forward, by line
    assert info.value.sift_node is not None


class DropsOneMaskEntry(Pass):
    """Clears one kept entry of the first mask after the draws: its count no longer matches its density."""

    name = "drops-one-mask-entry"

    def call(self, unit) -> PassResult:
        mask = first_masked(unit).weight_mask
        with torch.no_grad():
            mask.view(-1)[int(mask.view(-1).nonzero()[0])] = False
        unit.touch()
        return PassResult(True)


DROPPED = "test-dropped-mask-entry"


def _dropped_pipeline(config):
    compensate, init_masks, verify = finish_passes(config)
    return [SparseParallelPass(config.sparsity, defer_init=True), compensate, init_masks, DropsOneMaskEntry(), verify]


def _names_pass_layer_and_line(message: str, pass_name: str, layer: str) -> None:
    assert f"[{pass_name}]" in message
    assert f"at '{layer}'" in message  # the node, by its module path
    assert "test_pass_contract.py:" in message and "in forward" in message  # SmallCNN.forward's line


def test_a_wrong_mask_count_names_verify_the_layer_and_its_source_line():
    torch.manual_seed(0)
    with pytest.raises(PassError) as info:
        sift.compile(SmallCNN(), DROPPED, 0.75, (example(),), output="graph")
    message = str(info.value)
    assert "non-zeros, expected" in message
    _names_pass_layer_and_line(message, "verify", "conv.branches.0.layer")
    assert info.value.sift_node is not None


def test_an_unpayable_dense_cost_names_the_compensation_the_costliest_layer_and_its_line():
    torch.manual_seed(0)  # Doped at 3x its rank: the dense U and V alone cost more than the dense model
    with pytest.raises(PassError) as info:
        sift.compile(SmallCNN(), "doped", 0.75, (example(),), output="graph", capacity=3.0)
    message = str(info.value)
    assert "no sparsity can make this model iso-FLOP" in message
    assert "lower the capacity (now 3)" in message and "doped at s = 0.75" in message  # from the pass's options
    _names_pass_layer_and_line(message, "iso-flop-compensation", "conv.u")


@sift.leaf_module
class ChannelsOnlyBatchNorm(nn.BatchNorm2d):
    """A model's own BatchNorm whose constructor takes the channel count alone: Sparse Wide rebuilds
    a widened norm by calling its type with torch's arguments (eps=, momentum=, ...), which this one refuses."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)


class OwnBatchNorm(SmallCNN):
    def __init__(self) -> None:
        super().__init__()
        self.bn = ChannelsOnlyBatchNorm(16)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(F.relu(self.stem(x)))))
        return self.head(x.mean((2, 3)))


def test_a_failure_resizing_a_module_names_sparse_wide_the_module_and_its_line():
    torch.manual_seed(0)
    with pytest.raises(PassError) as info:
        sift.compile(OwnBatchNorm(), "wide", 0.75, (example(),), output="graph")
    message = str(info.value)
    assert "ChannelsOnlyBatchNorm" in message and "unexpected keyword argument" in message  # the real failure
    _names_pass_layer_and_line(message, "sparse-wide", "bn")


class ReshapesChannels(SmallCNN):
    """A literal channel count in a view: Sparse Wide rewrites it."""

    def forward(self, x):
        x = F.relu(self.conv(F.relu(self.stem(x))))
        return self.head(x.reshape(x.shape[0], 16, -1).mean(2))


class RefusesLiterals(RewriteLog):
    """A rewrite log that fails to record a literal. No real model makes Sparse Wide's rewrite of a
    literal fail (capture binds sizes given by keyword to positions, and the rewrite only writes the
    new size where coupling found the old one), so the failure comes through the unit's public log,
    inside the rewrite itself."""

    def literal(self, node, old, new) -> None:
        raise RuntimeError("cannot rewrite this size")


def test_a_failure_rewriting_a_literal_names_sparse_wide_the_view_and_its_line():
    torch.manual_seed(0)
    unit = CompilationUnit(sift.capture(ReshapesChannels(), (example(),)).module, (example(),),
                           config=CompileConfig("wide", 0.75), record_baseline=True)
    unit.rewrites = RefusesLiterals()
    with pytest.raises(PassError) as info:
        PassManager([SparseWidePass(0.75)]).run(unit)
    message = str(info.value)
    assert "[sparse-wide]" in message and "cannot rewrite this size" in message
    assert "'reshape" in message and "test_pass_contract.py:" in message  # the view node, by its line


def test_the_cli_exit_code_of_a_user_input_error_inside_a_pass_stays_2(capsys):
    from sift_compiler.cli._common import run_main
    from sift_compiler.cli.compile import build_parser

    def body(args):
        PassManager([RaisesUserInput()]).run(compiled_unit())
        return 0
    assert run_main("sift-compile", body, build_parser(), ["model"]) == 2
    assert "[raises-user-input]" in capsys.readouterr().err


# ------------------------------------------------------------------ iso-FLOP is a postcondition
class OverspendOneLayer(Pass):
    """Doubles one sparse layer's density after the compensation: the model costs more than dense."""

    name = "overspend-one-layer"

    def call(self, unit) -> PassResult:
        layer = first_masked(unit)
        layer.target_density = min(1.0, 2 * layer.target_density)
        unit.touch()
        return PassResult(True)


OVERSPENT = "test-overspent"


def _overspent_pipeline(config):
    compensate, init_masks, verify = finish_passes(config)
    return [SparseParallelPass(config.sparsity, defer_init=True), compensate, OverspendOneLayer(), init_masks, verify]


@pytest.fixture(scope="module", autouse=True)
def _test_transforms():
    """The two broken pipelines above as transforms, for this module's tests only."""
    with temporary_transform(DROPPED, _dropped_pipeline, SparseParallelPass, "parallel, one mask entry dropped"), \
            temporary_transform(OVERSPENT, _overspent_pipeline, SparseParallelPass, "parallel, one layer overspent"):
        yield


def test_an_iso_flop_miss_beyond_rounding_is_a_postcondition_error():
    torch.manual_seed(0)
    with pytest.raises(PostconditionError, match=r"\[verify\] not iso-FLOP"):
        sift.compile(SmallCNN(), OVERSPENT, 0.75, (example(),), output="graph")


def test_a_raised_flop_tolerance_accepts_the_miss_and_the_notes_keep_the_ratio():
    torch.manual_seed(0)
    result = sift.compile(SmallCNN(), OVERSPENT, 0.75, (example(),), output="graph", flop_tolerance=0.9)
    assert result.report.flop_ratio > 1.01
    assert any("sift/dense" in note and "flop_tolerance 0.9" in note for note in result.unit.notes)


def test_a_tiny_flop_tolerance_below_the_rounding_is_refused():
    torch.manual_seed(0)
    with pytest.raises(PostconditionError, match="flop_tolerance"):
        sift.compile(SmallCNN(), "wide", 0.9, (example(),), output="graph", flop_tolerance=1e-12)


@pytest.mark.parametrize("transform", ["parallel", "factorized", "doped", "wide"])
def test_the_builtin_transforms_pass_the_default_iso_flop_check(transform):
    torch.manual_seed(0)
    result = sift.compile(SmallCNN(), transform, 0.75, (example(),), output="graph")
    assert "verify" in result.unit.history


def test_capacity_and_latency_budgets_are_not_checked_for_iso_flop():
    torch.manual_seed(0)
    result = sift.compile(SmallCNN(), "wide", 0.75, (example(),), output="graph", budget="latency", capacity=3.0)
    assert result.report.flop_ratio > 1.05  # far off iso-FLOP by request, and no error
    assert not CompileConfig("wide", 0.75, capacity=3.0).iso_flop


def test_flop_tolerance_is_validated():
    with pytest.raises(UserInputError, match="flop_tolerance"):
        CompileConfig("parallel", 0.5, flop_tolerance=2.0)


# ------------------------------------------------------------------ the baseline is the unit's
def test_the_baseline_is_measured_by_the_unit_before_any_pass():
    unit = compiled_unit()
    assert unit.baseline is unit.dense_baseline.flops
    assert unit.baseline_layers is unit.dense_baseline.layers
    assert unit.baseline_outputs == unit.dense_baseline.outputs
    assert unit.baseline.weight_dense > 0
    with pytest.raises(AttributeError):
        unit.baseline = None  # recorded once, by the unit


# ------------------------------------------------------------------ the manager, and conditions that crash
class CrashesInItsConditions(Pass):
    """``requires`` or ``ensures`` fails with a plain Python error, as a bug in one would."""

    name = "crashes-in-conditions"

    def __init__(self, where: str) -> None:
        self.where = where

    def requires(self, unit) -> None:
        if self.where == "requires":
            {}["missing"]

    def call(self, unit) -> PassResult:
        return PassResult(False)

    def ensures(self, unit) -> None:
        if self.where == "ensures":
            raise RuntimeError("shapes do not propagate")


@pytest.mark.parametrize("where, cls, what", [("requires", PreconditionError, "precondition failed: KeyError"),
                                              ("ensures", PostconditionError, "postcondition failed: RuntimeError")])
def test_an_error_in_requires_or_ensures_names_the_pass_as_one_in_call_does(where, cls, what):
    unit = compiled_unit()
    unit.history.append("earlier-pass")
    with pytest.raises(cls) as info:
        CrashesInItsConditions(where)(unit)
    assert f"[crashes-in-conditions] {what}" in str(info.value) and "earlier-pass" in str(info.value)
    assert info.value.pass_name == "crashes-in-conditions"


class ModifiesTwice(Pass):
    """Modifies the unit on its first two calls only."""

    name = "modifies-twice"

    def __init__(self) -> None:
        self.calls = 0

    def call(self, unit) -> PassResult:
        self.calls += 1
        if self.calls <= 2:
            unit.touch()
            return PassResult(True)
        return PassResult(False)


def test_pass_manager_runs_each_pass_once_and_says_whether_any_modified():
    unit = compiled_unit()
    p = ModifiesTwice()
    assert PassManager([p]).run(unit) is True and p.calls == 1
    p.calls = 2
    assert PassManager([p]).run(unit) is False and p.calls == 3



def test_what_a_postcondition_computed_is_kept_for_the_next_pass():
    """A rewrite's ensures propagates shapes on the graph it left: compensation reuses that result
    (shapes run once for the baseline and once after the rewrite, not again), and an analysis the
    ensures did not compute is still dropped."""
    unit = CompilationUnit(sift.capture(SmallCNN(), (example(),)).module, (example(),),
                           config=CompileConfig("parallel", 0.75), record_baseline=True)
    before = dict(unit.analyses.computed)
    PassManager([SparseParallelPass(0.75, defer_init=True), *finish_passes(CompileConfig("parallel", 0.75))]).run(unit)
    assert unit.analyses.computed["shapes"] - before["shapes"] == 1
    assert unit.analyses.computed["flops"] - before["flops"] >= 1
