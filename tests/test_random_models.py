"""Random MLPs and CNNs (hypothesis): every transform keeps the invariants."""
from __future__ import annotations

import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import sift_compiler as sift
from sift_compiler.errors import PassError
from sift_compiler.testing import assert_masks_exact
from checks import assert_allclose_outputs, assert_grads_only_unmasked, independent_weight_flops

TRANSFORMS = st.sampled_from(["parallel", "factorized", "doped", "wide"])
SPARSITY = st.sampled_from([0.5, 0.75, 0.9])
SETTINGS = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def mlp(widths, activation):
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), activation()]
    return nn.Sequential(*layers[:-1])


def cnn(channels, kernel, stride, dims):
    conv, norm = (nn.Conv1d, nn.BatchNorm1d) if dims == 1 else (nn.Conv2d, nn.BatchNorm2d)
    pool = nn.AdaptiveAvgPool1d(1) if dims == 1 else nn.AdaptiveAvgPool2d(1)
    layers = []
    for i, (a, b) in enumerate(zip(channels, channels[1:])):
        layers += [conv(a, b, kernel, stride=stride if i == 0 else 1, padding=kernel // 2), norm(b), nn.ReLU()]
    return nn.Sequential(*layers, pool, nn.Flatten(), nn.Linear(channels[-1], 5))


def check(model, x, transform, sparsity, tmp_path):
    model.eval()
    with torch.no_grad():
        dense_shape = model(x).shape
    try:
        result = sift.compile(model, transform, sparsity, (x,))
    except PassError as e:  # Sparse Wide on a net whose widened first/last layers outweigh the rest
        assert transform == "wide" and "no sparsity can make this model iso-FLOP" in str(e)
        assume(False)
    assert abs(result.report.flop_ratio - 1) <= 0.005, result.report.table()
    assert independent_weight_flops(result.module, (x,), {}) == pytest.approx(result.report.sift_flops, rel=1e-6)
    assert_masks_exact(result.module)
    result.module.train()
    out = result.module(x)
    assert out.shape == dense_shape
    out.pow(2).sum().backward()
    assert_grads_only_unmasked(result.module)
    result.module.eval()
    path = str(tmp_path / f"{transform}.onnx")
    sift.export_onnx(result.module, (x,), path, deepsparse="skip")  # DeepSparse: tests/test_export_*
    with torch.no_grad():
        expected = result.module(x).numpy()
    got = ort.InferenceSession(path).run(None, {"input": x.numpy()})
    assert_allclose_outputs(got, [expected])


@SETTINGS
@given(widths=st.lists(st.sampled_from([48, 64, 96, 128]), min_size=5, max_size=7),
       activation=st.sampled_from([nn.ReLU, nn.GELU, nn.SiLU]), transform=TRANSFORMS, sparsity=SPARSITY,
       rows=st.sampled_from([(3,), (2, 5)]))
def test_random_mlps(widths, activation, transform, sparsity, rows, tmp_path_factory):
    torch.manual_seed(0)
    x = torch.randn(*rows, widths[0])
    check(mlp(widths, activation), x, transform, sparsity, tmp_path_factory.mktemp("mlp"))


@SETTINGS
@given(channels=st.lists(st.sampled_from([32, 48, 64]), min_size=4, max_size=5),
       kernel=st.sampled_from([1, 3, 5]), stride=st.sampled_from([1, 2]), dims=st.sampled_from([1, 2]),
       transform=TRANSFORMS, sparsity=SPARSITY)
def test_random_cnns(channels, kernel, stride, dims, transform, sparsity, tmp_path_factory):
    torch.manual_seed(0)
    channels = [3] + channels
    x = torch.randn(2, 3, *((12,) * dims))
    check(cnn(channels, kernel, stride, dims), x, transform, sparsity, tmp_path_factory.mktemp("cnn"))
