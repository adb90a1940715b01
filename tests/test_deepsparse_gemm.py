"""The outcome policy on a file DeepSparse 1.8 miscomputes: some sparse Gemm stacks (Sparse Parallel
on a 48-72-180-72-64 MLP at s = 0.5) disagree with onnxruntime by ~45% of the output scale, in the
branch form and in the stacked form alike. The file is right (onnxruntime agrees with torch), so it
is written and marked not for DeepSparse, sift-check reports the mark, sift-compile exits 1;
``deepsparse="require"`` writes nothing. If a DeepSparse release fixes the bug, these tests fail:
then docs/deployment.md should change, not the expectations silently."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import sift_compiler as sift
from sift_compiler.cli.check import main as check_main
from sift_compiler.cli.compile import main as compile_main
from sift_compiler.errors import VerificationFailed
from checks import exit_status

pytestmark = pytest.mark.deepsparse
SPEC = "test_deepsparse_gemm:mlp"


def mlp():
    torch.manual_seed(0)
    widths = [48, 72, 180, 72, 64]
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


@pytest.fixture(scope="module")
def compiled():
    x = torch.randn(10, 48)
    return sift.compile(mlp(), "parallel", 0.5, (x,)), x


def test_require_writes_nothing_after_trying_the_remedies(compiled, tmp_path):
    result, x = compiled
    with pytest.raises(VerificationFailed, match=r"not written: deepsparse-vs-onnxruntime: max abs error .*\(only "
                                                 r"DeepSparse's checks fail.*remedies tried: form stacked-conv"):
        sift.export_onnx(result.module, (x,), str(tmp_path / "mlp.onnx"), deepsparse="require")
    assert list(tmp_path.iterdir()) == []


def test_auto_writes_the_correct_file_marked_and_sift_check_reports_it(compiled, tmp_path, capsys):
    result, x = compiled
    path = tmp_path / "mlp.onnx"
    info = sift.export_onnx(result.module, (x,), str(path))
    assert info.outcome == "not-for-deepsparse" and info.deepsparse_reason.startswith("deepsparse-vs-onnxruntime")
    status = {c.name: c.status for c in info.verification.checks}
    assert status["onnxruntime-vs-torch"] == "ok" and status["deepsparse-vs-onnxruntime"] == "FAILED"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx"]

    assert check_main([str(path), "--no-deepsparse"]) == 0     # right for onnxruntime...
    capsys.readouterr()
    assert check_main([str(path)]) == 1                        # ...and marked for DeepSparse
    err = capsys.readouterr().err
    assert "deepsparse-allowed: the exporter found that DeepSparse must not run this file" in err


def test_sift_compile_writes_it_says_so_in_one_line_and_exits_1(tmp_path, capsys):
    path = tmp_path / "mlp.onnx"
    common = [SPEC, "-t", "parallel", "-s", "0.5", "--input-shape", "10,48", "-q", "--onnx", path]
    assert exit_status(compile_main, common) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "DeepSparse must not run" in line]
    assert len(lines) == 1 and lines[0].startswith(f"sift-compile: {path}: written for onnxruntime; DeepSparse must "
                                                   "not run it: deepsparse-vs-onnxruntime")
    assert path.exists()
    path.unlink()
    assert exit_status(compile_main, common + ["--deepsparse", "require"]) == 1
    assert "fails verification, not written" in capsys.readouterr().err and not path.exists()
