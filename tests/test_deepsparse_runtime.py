"""sift's DeepSparse runner never writes the user's file (DeepSparse 1.8's ``input_shapes`` rewrites it in place)."""
from __future__ import annotations

import hashlib
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from sift_compiler.errors import UserInputError
from sift_compiler.exporters.runtimes import open_engine

pytestmark = pytest.mark.deepsparse


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def symbolic_file(tmp_path):
    """A conv net whose height and width are symbolic too: DeepSparse needs fixed shapes for it."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    path = str(tmp_path / "symbolic.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 3, 8, 8),), path, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch", 2: "h", 3: "w"}, "output": {0: "batch"}})
    return net, path


@pytest.mark.parametrize("shape", [[2, 3, 8, 8], [3, 3, 12, 10]])
def test_fixed_shapes_compile_from_a_private_copy(symbolic_file, shape):
    net, path = symbolic_file
    before = _sha(path)
    engine = open_engine("deepsparse", path, shape[0], None, [shape])
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    (out,) = engine.run({"input": x})
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    assert np.abs(out - expected).max() < 1e-4
    assert _sha(path) == before


def test_unknown_engine_is_a_user_error(symbolic_file):
    with pytest.raises(UserInputError, match="unknown engine 'tvm': choose from deepsparse, onnxruntime"):
        open_engine("tvm", symbolic_file[1], 1)
