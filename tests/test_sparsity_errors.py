"""Bad arguments give a UserInputError that says what is wrong and what to do."""
import pytest
import torch
import torch.nn as nn

import sift_compiler as sift
from sift_compiler.errors import UserInputError
from test_sparsity_common import TinyCNN, compiled


def _opt(module):
    return torch.optim.SGD(module.parameters(), lr=0.1)


@pytest.mark.parametrize("cls", ["RigL", "SET"])
def test_total_steps_smaller_than_update_interval(cls):
    module = compiled()
    with pytest.raises(UserInputError, match=r"total_steps \(50\) is smaller than update_interval \(100\)"):
        getattr(sift.sparsity, cls)(module, _opt(module), total_steps=50)


def test_schedule_with_no_update_before_the_end():
    module = compiled()
    with pytest.raises(UserInputError, match="no mask update would happen: updates stop at step 90"):
        sift.sparsity.RigL(module, _opt(module), total_steps=120)


@pytest.mark.parametrize("kwargs, match", [
    (dict(total_steps=0), "total_steps must be a positive integer"),
    (dict(total_steps=1000, update_interval=2.5), "update_interval must be a positive integer"),
    (dict(total_steps=1000, drop_fraction=1.5), r"drop_fraction must lie in \(0, 1\]"),
    (dict(total_steps=1000, end_fraction=0.0), r"end_fraction must lie in \(0, 1\]"),
])
def test_schedule_arguments(kwargs, match):
    module = compiled()
    with pytest.raises(UserInputError, match=match):
        sift.sparsity.RigL(module, _opt(module), **kwargs)


@pytest.mark.parametrize("cls", ["Static", "RigL"])
def test_module_with_no_masked_layers(cls):
    for module in (TinyCNN(), compiled(transform="none", sparsity=0.0)):
        kwargs = {} if cls == "Static" else dict(total_steps=1000)
        with pytest.raises(UserInputError, match="no sparse masked layers; compile it first"):
            getattr(sift.sparsity, cls)(module, _opt(module), **kwargs)


@pytest.mark.parametrize("density", [0.0, 1.5, -0.2])
def test_layer_sparsity_out_of_range(density):
    module = compiled()
    name, layer = next(iter(sift.sparsity.iter_masked(module)))
    layer.target_density = density
    with pytest.raises(UserInputError, match=rf"{name}.weight.*sparsity must lie in \[0, 1\)"):
        sift.sparsity.Static(module, _opt(module))


@pytest.mark.parametrize("n, m, match", [
    (9, 8, r"N <= M .* n=9 > m=8"),
    (8, 8, r"8:8 means sparsity 0, outside \(0, 1\)"),
    (0, 8, r"0:8 means sparsity 1, outside \(0, 1\)"),
    (None, 8, "needs integers n and m"),
    (2, 1, "at least 2"),
])
def test_bad_nm(n, m, match):
    module = compiled()
    with pytest.raises(UserInputError, match=match):
        sift.sparsity.RigL(module, _opt(module), total_steps=1000, pattern="nm", n=n, m=m)


def test_nm_density_must_match_the_compiled_density():
    module = compiled(0.75)
    with pytest.raises(UserInputError, match=r"4:8-T gives density 0.5 .* compile with sparsity=0.5"):
        sift.sparsity.Static(module, _opt(module), pattern="nm", n=4, m=8)


def test_nm_needs_whole_blocks():
    module = compiled(0.75)
    with pytest.raises(UserInputError, match=r"4:16-T masks need .*columns \(in x kernel\) = 72 not a multiple of m = 16"):
        sift.sparsity.Static(module, _opt(module), pattern="nm", n=4, m=16)


def test_unknown_pattern_and_wrong_optimizer():
    module = compiled()
    with pytest.raises(UserInputError, match="unknown mask pattern 'block'"):
        sift.sparsity.Static(module, _opt(module), pattern="block")
    with pytest.raises(UserInputError, match="needs a torch.optim.Optimizer"):
        sift.sparsity.Static(module, object())
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(UserInputError, match="the optimizer does not train"):
        sift.sparsity.Static(module, other)


def test_mask_count_that_does_not_match_the_target():
    module = compiled()
    name, layer = next(iter(sift.sparsity.iter_masked(module)))
    layer.weight_mask.fill_(True)
    with pytest.raises(UserInputError, match="asks for exactly .*init_masks"):
        sift.sparsity.Static(module, _opt(module))


def test_load_state_dict_from_another_configuration():
    module = compiled()
    rigl = sift.sparsity.RigL(module, _opt(module), total_steps=1000)
    other = compiled()
    set_ = sift.sparsity.SET(other, _opt(other), total_steps=1000)
    with pytest.raises(UserInputError, match="configured differently.*method: saved 'rigl', now 'set'"):
        set_.load_state_dict(rigl.state_dict())
    with pytest.raises(UserInputError, match="not a mask-engine state dict"):
        set_.load_state_dict({"step": 3})
