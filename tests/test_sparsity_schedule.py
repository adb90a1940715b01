"""The update schedule: which steps update, and the cosine-decayed drop fraction the engine applies."""
import math

import pytest
import torch

import sift_compiler as sift
from sift_compiler.sparsity import UpdateSchedule
from test_sparsity_common import batches, compiled, train


def test_paper_defaults():
    s = UpdateSchedule(total_steps=78_200)     # CIFAR: 391 batches x 200 epochs
    assert (s.update_interval, s.drop_fraction, s.end_fraction, s.end_step) == (100, 0.3, 0.75, 58_650)
    steps = s.update_steps()
    assert steps[0] == 100 and steps[-1] == 58_600 and len(steps) == 586
    assert not s.is_update_step(0) and not s.is_update_step(58_700) and not s.is_update_step(150)


@pytest.mark.parametrize("t", [0, 1, 100, 12_345, 29_325, 58_000, 58_650, 70_000])
def test_drop_fraction_is_the_cosine(t):
    s = UpdateSchedule(total_steps=78_200)
    expected = 0.3 * (1 + math.cos(math.pi * min(t, 58_650) / 58_650)) / 2
    assert s.drop_fraction_at(t) == pytest.approx(expected, abs=1e-12)
    assert s.drop_fraction_at(29_325) == pytest.approx(0.15)  # half way: half the initial fraction


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_engine_drops_the_scheduled_fraction_of_every_layer(method):
    """Each update drops int(alpha(t) * count) weights per layer; the record shows the cosine."""
    module = compiled()
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    cls = {"set": sift.sparsity.SET, "rigl": sift.sparsity.RigL}[method]
    engine = cls(module, opt, total_steps=40, update_interval=5, drop_fraction=0.4, end_fraction=0.8)
    train(module, opt, engine, batches(40))
    assert [h["step"] for h in engine.history] == [5, 10, 15, 20, 25, 30]
    for h in engine.history:
        alpha = 0.4 * (1 + math.cos(math.pi * h["step"] / 32)) / 2
        assert h["drop_fraction"] == pytest.approx(alpha)
        # regrowth may pick just-dropped positions, so at most (not exactly) this many change
        assert h["replaced"] == sum(int(alpha * w.count) for w in engine.weights)
        assert 0 < h["dropped"] == h["grown"] <= h["replaced"]
    dropped = [h["dropped"] for h in engine.history]
    assert dropped == sorted(dropped, reverse=True)  # decays with the cosine
