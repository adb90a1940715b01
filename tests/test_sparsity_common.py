"""Shared pieces of the mask-engine tests (tiny compiled CNN, data, a training loop) and their own checks."""
import copy
import functools
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import sift_compiler as sift
from sift_compiler.sparsity import MaskedLinear, exact_count, is_transposable_nm
from sift_compiler.sparsity.init import layer_generator
from sift_compiler.testing import assert_masks_exact

ENGINES = {"static": lambda mod, opt, **kw: sift.sparsity.Static(mod, opt, **kw),
           "set": lambda mod, opt, **kw: sift.sparsity.SET(mod, opt, total_steps=24, update_interval=4, **kw),
           "rigl": lambda mod, opt, **kw: sift.sparsity.RigL(mod, opt, total_steps=24, update_interval=4, **kw)}
PATTERNS = {"unstructured": {}, "2:8-T": dict(pattern="nm", n=2, m=8)}


class TinyCNN(nn.Module):
    """Stem, two 3x3 convs (8->8, 8->16: GEMM views 8x72 and 16x72, so 8x8 blocks fit), head."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width)
        self.conv1, self.bn1 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def compiled(sparsity: float = 0.75, transform: str = "parallel", dtype=torch.float32, seed: int = 0) -> nn.Module:
    """A fresh copy of TinyCNN compiled with these settings (the same weights for the same seed)."""
    return copy.deepcopy(_compiled(sparsity, transform, dtype, seed))


@functools.lru_cache(maxsize=None)
def _compiled(sparsity, transform, dtype, seed) -> nn.Module:
    torch.manual_seed(seed)
    x = torch.randn(2, 1, 8, 8, dtype=dtype)
    return sift.compile(TinyCNN().to(dtype), transform, sparsity, (x,), seed=seed).module


def batches(count: int, size: int = 16, seed: int = 1, dtype=torch.float32) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 8, 8, generator=gen, dtype=dtype), torch.randint(0, 10, (size,), generator=gen))
            for _ in range(count)]


def train(module: nn.Module, optimizer, engine, data, after_step: Optional[Callable[[int], None]] = None) -> None:
    """The loop of the README: backward, optimizer.step(), masks.step(), zero_grad."""
    module.train()
    for i, (x, y) in enumerate(data):
        F.cross_entropy(module(x), y).backward()
        optimizer.step()
        engine.step()
        optimizer.zero_grad()
        if after_step is not None:
            after_step(i + 1)


def assert_state_masked(engine) -> None:
    """Optimizer state tensors shaped like a sparse weight are zero where its mask is."""
    for w in engine.weights:
        for key, value in engine.optimizer.state.get(w.param, {}).items():
            if isinstance(value, torch.Tensor) and value.shape == w.param.shape:
                assert not bool(value[~w.layer.weight_mask].any()), f"{w.name}: state {key!r} non-zero off-mask"


def assert_exact(module: nn.Module, engine, n: int = 0, m: int = 0) -> None:
    assert_masks_exact(module)
    assert_state_masked(engine)
    for w in engine.weights:
        assert int(w.layer.weight_mask.sum()) == w.count == exact_count(w.layer.target_density, w.param.numel())
        if n:
            assert is_transposable_nm(w.layer.weight_mask, n, m), w.name


class OneLayer(nn.Module):
    """A single masked 8x8 linear; ``forward(eye)`` returns (W*M)^T, so loss = sum(out * G^T) has
    dense gradient exactly G with respect to W*M."""

    def __init__(self, density: float = 0.25, seed: int = 0) -> None:
        super().__init__()
        self.layer = MaskedLinear(8, 8, bias=False)
        self.layer.target_density = density
        gen = layer_generator(seed, "layer")
        self.layer.set_mask(sift.sparsity.random_mask((8, 8), density, gen))

    def forward(self, x):
        return self.layer(x)


def constructed_step(model: OneLayer, optimizer, engine, grad: torch.Tensor) -> bool:
    out = model(torch.eye(8))
    (out * grad.t()).sum().backward()
    optimizer.step()
    changed = engine.step()
    optimizer.zero_grad()
    return changed


def test_tiny_cnn_compiles_with_nm_friendly_sparse_layers():
    """The helpers' model has the sparse layers the other tests rely on."""
    module = compiled()
    shapes = {name: tuple(mask.shape) for name, mask in sift.sparsity.masks(module).items()}
    assert len(shapes) == 8 and set(shapes.values()) == {(8, 8, 3, 3), (16, 8, 3, 3)}
    assert_masks_exact(module)


def test_constructed_layer_has_dense_gradient_only_in_dense_grad_mode():
    """The straight-through forward: same output, gradient G everywhere instead of G * M."""
    model = OneLayer()
    grad = torch.randn(8, 8)
    layer = model.layer
    for dense in (False, True):
        layer.dense_grad = dense
        out = model(torch.eye(8))
        assert torch.equal(out, (layer.weight * layer.weight_mask).t())
        (out * grad.t()).sum().backward()
        expected = grad if dense else grad * layer.weight_mask
        assert torch.allclose(layer.weight.grad, expected)
        layer.weight.grad = None


def test_cached_float_mask_follows_every_way_a_mask_changes():
    """The layer caches its 0/1 mask for speed; set_mask, load_state_dict, copy_ and dtype changes
    must all show up in the next forward."""
    model = OneLayer(density=0.5)
    layer, eye = model.layer, torch.eye(8)

    def check():
        assert torch.equal(model(eye.to(layer.weight.dtype)), (layer.weight * layer.weight_mask).t())

    check()
    layer.set_mask(~layer.weight_mask)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(8, 8))        # dense weights: a stale mask would show
    check()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["layer.weight_mask"] = ~state["layer.weight_mask"]
    model.load_state_dict(state)
    check()
    layer.weight_mask.copy_(torch.eye(8, dtype=torch.bool))
    check()
    model.double()
    check()
    assert layer.float_mask().dtype == torch.float64


def test_engine_managed_forward_matches_the_masked_product():
    """While an engine manages a layer its forward skips the W * M product (weights are zero off
    the mask); outputs and gradients must equal those of the product."""
    module = compiled()
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    engine = sift.sparsity.Static(module, opt)
    x, y = batches(1)[0]
    results = []
    for managed in (True, False):
        for w in engine.weights:
            w.layer.engine_managed = managed
        module.zero_grad()
        loss = F.cross_entropy(module(x), y)
        loss.backward()
        results.append((loss.detach(), [w.param.grad.clone() for w in engine.weights]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    assert all(not bool(g[~w.layer.weight_mask].any()) for g, w in zip(results[0][1], engine.weights))
    engine.remove()
    assert not any(w.layer.engine_managed for w in engine.weights)
