"""SparseML interop: a recipe naming exactly the sparse weights, run by SparseML's own manager."""
import os

import pytest
import torch
import torch.nn.functional as F

import sift_compiler as sift
from sift_compiler.errors import UserInputError
from sift_compiler.integrations import sparseml as interop
from test_sparsity_common import batches, compiled

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
STEPS_PER_EPOCH, EPOCHS = 4, 3


def _zeros(module):
    params = dict(module.named_parameters())
    return {name: params[name] == 0 for name in interop.sparse_weights(module)}


def _train(module, optimizer, data, after_step):
    for x, y in data:
        F.cross_entropy(module(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        after_step()


def test_recipe_names_exactly_the_sparse_parameters_and_writes_atomically(tmp_path):
    module = compiled()
    path = tmp_path / "recipe.yaml"
    text = interop.recipe(module, "rigl", epochs=10, steps_per_epoch=50, path=str(path))
    assert path.read_text() == text
    names = sorted(sift.sparsity.masks(module))
    listed = [line.strip()[3:-1] for line in text.splitlines() if line.strip().startswith("- '")]
    assert listed == names
    assert "update_frequency: 2.0" in text and "end_epoch: 7.5" in text and "final_sparsity: 0.75" in text
    constant = interop.recipe(module, "constant", epochs=2)
    assert "!ConstantPruningModifier" in constant and "RigL" not in constant


def test_recipe_errors():
    module = compiled()
    with pytest.raises(UserInputError, match="no SET modifier"):
        interop.recipe(module, "set")
    with pytest.raises(UserInputError, match="needs steps_per_epoch"):
        interop.recipe(module, "rigl")
    with pytest.raises(UserInputError, match="no sparse masked weights"):
        interop.recipe(torch.nn.Linear(3, 3))
    with pytest.raises(UserInputError, match="no mask update would happen"):
        interop.recipe(module, "rigl", epochs=1, steps_per_epoch=10)


@pytest.mark.parametrize("method", ["constant", "rigl"])
def test_sparseml_manager_keeps_the_sparsity(method, tmp_path, monkeypatch):
    """Our in-forward masks are released, so only SparseML keeps the zeros; a control run without
    the manager shows they would otherwise fill in."""
    import sparseml.pytorch.optim as manager_module  # installed by make test: missing is a failure
    monkeypatch.chdir(tmp_path)  # SparseML writes ./sparse_logs
    data = batches(STEPS_PER_EPOCH * EPOCHS)

    control = compiled()
    interop.release_masks(control)
    opt = torch.optim.SGD(control.parameters(), lr=0.1, momentum=0.9)
    _train(control, opt, data, lambda: None)
    assert all(float(z.float().mean()) < 0.5 for z in _zeros(control).values())   # 75% zeros -> mostly gone

    module = compiled()
    initial = _zeros(module)
    text = interop.recipe(module, method, epochs=EPOCHS, steps_per_epoch=STEPS_PER_EPOCH, update_interval=2)
    assert interop.release_masks(module) == {n: int((~z).sum()) for n, z in initial.items()}
    manager = manager_module.ScheduledModifierManager.from_yaml(text)
    pruning = [m for m in manager.iter_modifiers() if hasattr(m, "params") and "Pruning" in type(m).__name__]
    assert sorted(p for m in pruning for p in m.params) == sorted(initial)
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    kwargs = {}
    if method == "rigl":
        def loader(**_):  # built once, iterated at every update: a list, not a generator
            return [([x], {}, y) for x, y in data[:2]]
        kwargs["grad_sampler"] = {"data_loader_builder": loader, "loss_function": F.cross_entropy}
    wrapped = manager.modify(module, opt, steps_per_epoch=STEPS_PER_EPOCH, **kwargs)
    seen = []

    def check():
        zeros = _zeros(module)
        seen.append({n: z.clone() for n, z in zeros.items()})
        for name, z in zeros.items():
            # RigL's regrown weights start at exactly zero, so right after an update zeros may exceed 75%
            assert int(z.sum()) >= int(initial[name].sum()), name
            if method == "constant":
                assert torch.equal(z, initial[name]), name

    _train(module, wrapped, data, check)
    manager.finalize(module)
    if method == "rigl":
        assert any(not torch.equal(seen[0][n], seen[-1][n]) for n in initial)       # SparseML moved the masks
    densities = interop.adopt_masks(module)
    for name, z in initial.items():
        assert densities[name] <= 0.25 + 1e-9
        assert densities[name] > (0.25 if method == "constant" else 0.2) - 1e-9
