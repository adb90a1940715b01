"""A second DeepSparse 1.8 miscomputation, found by the export check on random MLPs: some sparse
Gemm stacks (e.g. Sparse Parallel on 48-72-180-72-64 at s = 0.5) disagree with onnxruntime by
~45% of the output scale. The check must refuse the file, say why and what to do, and
onnxruntime-only export must still work."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import sift_compiler as sift
from sift_compiler.errors import ExportError


def _mlp():
    torch.manual_seed(0)
    widths = [48, 72, 180, 72, 64]
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def test_check_refuses_the_miscomputed_file(tmp_path):
    x = torch.randn(10, 48)
    result = sift.compile(_mlp(), "parallel", 0.5, (x,))
    path = tmp_path / "mlp.onnx"
    with pytest.raises(ExportError, match="deepsparse-vs-onnxruntime.*--no-deepsparse-check"):
        sift.export_onnx(result.module, (x,), str(path))
    assert not path.exists()
    info = sift.export_onnx(result.module, (x,), str(path), deepsparse="skip")
    assert path.exists() and info.verification.ok
