"""Regression: DeepSparse 1.8 sums >= 9 convolutions of one input WRONGLY; sift's checks catch it.

The bad form is Sparse Parallel without a per-branch activation (the reference code's block:
``sum_j BN_j(conv_j(x))``), exported as B summed convs. onnxruntime computes it right (it agrees
with torch to 1e-6); DeepSparse's outputs are off by the size of the outputs. These tests keep
the proof that the exporter's verification and sift-check FAIL on that file, that the stacked
forms (and "auto", which stacks linear sums) route around the bug, and that "auto" switches to
the stacked form by itself if DeepSparse ever disagrees on the form it chose. If a DeepSparse release fixes the bug, the first test fails:
then the note in docs/deployment.md should change, not the test's expectation silently.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

from sift_compiler.cli.check import main as check_main
from sift_compiler.errors import ExportError
from sift_compiler.exporters import forms
from sift_compiler.exporters.forms import FORMS
from sift_compiler.exporters.onnx import export_onnx
from sift_compiler.exporters.outcome import OUTCOMES
from test_export_forms import make_branches, parallel_graph

pytestmark = pytest.mark.deepsparse


def summed_convs(branches: int = 10, channels: int = 64):
    """x -> sum of ``branches`` BN(conv3x3(x)) at density 1/B: the shape DeepSparse gets wrong."""
    dense = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    return parallel_graph(dense, make_branches(dense, branches, "identity", norm=True, seed=1))


@pytest.fixture(scope="module")
def bad_graph():
    torch.manual_seed(0)
    return summed_convs(), torch.randn(2, 64, 14, 14)


def test_verification_fails_on_summed_branch_convs(bad_graph, tmp_path, capsys):
    gm, x = bad_graph
    path = str(tmp_path / "summed.onnx")
    info = export_onnx(gm, (x,), path, form="branches", strict=False, deepsparse="require")
    status = {c.name: c.status for c in info.verification.checks}
    assert status["onnxruntime-vs-torch"] == "ok"            # onnxruntime is right...
    assert info.verification.errors["onnxruntime-vs-torch"].rel < 1e-5
    assert status["deepsparse-vs-onnxruntime"] == "FAILED"   # ...DeepSparse is not
    assert info.verification.errors["deepsparse-vs-onnxruntime"].rel > 0.1
    assert status["deepsparse-compiles"] == "ok" and info.verification.fraction_of_supported_ops == 1.0
    assert info.outcome == "failed" and info.outcome in OUTCOMES  # written anyway (strict=False), and says so

    assert check_main([path]) == 1                           # and sift-check says so in CI
    err = capsys.readouterr().err
    assert "1 check(s) failed" in err and "deepsparse-vs-onnxruntime: max abs error" in err


def test_strict_export_writes_nothing_for_the_bad_form(bad_graph, tmp_path):
    gm, x = bad_graph
    with pytest.raises(ExportError, match=r"fails verification, not written: deepsparse-vs-onnxruntime: max abs"):
        export_onnx(gm, (x,), str(tmp_path / "summed.onnx"), form="branches", deepsparse="require")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("form", [f for f in FORMS if f != "branches"])
def test_stacked_forms_route_around_the_bug(bad_graph, tmp_path, form):
    gm, x = bad_graph
    info = export_onnx(gm, (x,), str(tmp_path / f"{form}.onnx"), form=form, deepsparse="require")
    assert info.verification.ok, info.verification.table()
    assert info.verification.errors["deepsparse-vs-onnxruntime"].rel < 1e-5


def test_auto_falls_back_to_the_stacked_form_when_deepsparse_disagrees(bad_graph, tmp_path, monkeypatch):
    """If a branch form that "auto" keeps ever hits a DeepSparse bug, the export switches form, not silently ships.

    The policy is patched to keep even these linear branches, the one form known to trigger the bug.
    """
    gm, x = bad_graph
    monkeypatch.setattr(forms, "keeps_branches", lambda acts: True)
    path = tmp_path / "auto.onnx"
    info = export_onnx(gm, (x,), str(path), form="auto", deepsparse="require")
    assert info.form == "stacked-conv" and info.verification.ok, info.verification.table()
    assert info.notes[0].startswith("DeepSparse disagreed with onnxruntime on the branch form of 1 Sparse Parallel "
                                    "layers (max abs error")
    assert info.notes[0].endswith("exported as stacked-conv instead")
    assert os.listdir(tmp_path) == ["auto.onnx"]
