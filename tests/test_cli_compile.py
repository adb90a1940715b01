"""sift-compile from the outside: files written whole, bad input refused with exit code 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

from sift_compiler.cli.compile import main

SMALL = ["--input-shape", "1,3,32,32"]


def run(argv, capsys):
    """(exit code, stdout, stderr); argparse's own errors exit through SystemExit."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_compile_writes_report_onnx_and_model(tmp_path, capsys):
    onnx_path, report_path, model_path = tmp_path / "m.onnx", tmp_path / "r.json", tmp_path / "m.sift.pt"
    code, out, err = run(["torchvision:resnet18", "--transform", "parallel", "--sparsity", "0.75", *SMALL,
                          "--onnx", str(onnx_path), "--report", str(report_path), "-o", str(model_path)], capsys)
    assert code == 0, err
    assert "iso-FLOP ratio" in out and "layer1.0.conv1" in out
    report = json.loads(report_path.read_text())
    for key in ("transform", "sparsity", "dense_flops", "sift_flops", "flop_ratio", "total_dense_flops",
                "total_sift_flops", "layers"):
        assert key in report
    assert report["transform"] == "parallel" and report["sparsity"] == 0.75
    assert abs(report["flop_ratio"] - 1) < 0.005
    layer = report["layers"][0]
    assert set(layer) >= {"name", "kind", "dense_flops", "sift_flops", "sparsity", "kept_dense", "reason"}
    assert layer["name"] == "conv1" and layer["kept_dense"] and "first" in layer["reason"]
    session = ort.InferenceSession(str(onnx_path))
    assert session.run(None, {"input": torch.randn(2, 3, 32, 32).numpy()})[0].shape == (2, 1000)
    assert model_path.stat().st_size > 0
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_transform_none_is_the_dense_baseline(tmp_path, capsys):
    code, out, err = run(["torchvision:resnet18", "--transform", "none", *SMALL,
                          "--report", str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["flop_ratio"] == 1.0 and all(layer["kept_dense"] for layer in report["layers"])


@pytest.mark.parametrize("argv, message", [
    (["torchvision:resnet18", "--sparsity", "1.5"], "sparsity must lie in (0, 1)"),
    (["torchvision:resnet18", "--sparsity", "abc"], "sparsity must be a number"),
    (["torchvision:resnet18", "--sparsity", "0"], "sparsity must lie in (0, 1)"),
    (["torchvision:resnet18", "--transform", "sideways", "--sparsity", "0.5"], "invalid choice"),
    (["torchvision:resnet18"], "--sparsity is required"),
    (["torchvision:resnet1800", "--sparsity", "0.5"], "unknown torchvision model 'resnet1800'"),
    (["timm:not_a_model", "--sparsity", "0.5"], "unknown timm model"),
    (["transformers:gpt9", "--sparsity", "0.5"], "unknown transformers model type 'gpt9'"),
    (["missing_model.pt", "--sparsity", "0.5"], "does not exist"),
    (["torchvision:resnet18", "--sparsity", "0.5", "--input-shape", "1,3"], "rejects the example input"),
    (["torchvision:resnet18", "--sparsity", "0.5", "--input-shape", "1,x"], "--input-shape"),
    (["torchvision:resnet18", "--sparsity", "0.5", "--onnx", "/nonexistent/dir/m.onnx"], "does not exist"),
])
def test_bad_input_one_line_exit_2(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(argv, capsys)
    assert code == 2
    assert message in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1
    assert os.listdir(tmp_path) == []


def _save_model(path):
    torch.save(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)), path)


def test_pickle_refused_without_trust(tmp_path, capsys):
    path = tmp_path / "model.pt"
    _save_model(path)
    code, _, err = run([str(path), "--sparsity", "0.5", "--input-shape", "2,8"], capsys)
    assert code == 2 and "--trust-pickle" in err and "runs code" in err
    code, out, err = run([str(path), "--sparsity", "0.5", "--input-shape", "2,8", "--trust-pickle"], capsys)
    assert code == 0, err
    assert "iso-FLOP ratio" in out


def test_state_dict_file_says_what_to_pass(tmp_path, capsys):
    path = tmp_path / "weights.pt"
    torch.save(nn.Linear(3, 3).state_dict(), path)
    code, _, err = run([str(path), "--sparsity", "0.5"], capsys)
    assert code == 2 and "state dict" in err and "--weights" in err


def test_corrupt_file(tmp_path, capsys):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a torch file at all")
    code, _, err = run([str(path), "--sparsity", "0.5"], capsys)
    assert code == 2 and "not a file written by torch.save" in err


def test_failure_leaves_no_output_file(tmp_path, capsys):
    """The report is written before ONNX; an ONNX failure must remove it again."""
    report, onnx_path = tmp_path / "r.json", tmp_path / "m.onnx"
    code, _, err = run(["torchvision:resnet18", "--sparsity", "0.5", *SMALL, "--report", str(report),
                        "--onnx", str(onnx_path), "--opset", "9"], capsys)
    assert code == 2 and "opset" in err
    assert os.listdir(tmp_path) == []


def test_console_script_installed():
    out = subprocess.run([os.path.join(os.path.dirname(sys.executable), "sift-compile"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--transform" in out and "--trust-pickle" in out


def test_shortfall_is_one_warning_line_and_strict_makes_it_exit_2(tmp_path, capsys, monkeypatch):
    """Sparse Wide on a model whose channel group passes torch.roll (no coupling rule)."""
    monkeypatch.chdir(tmp_path)
    argv = ["test_sparse_wide:Rolled", "-t", "wide", "-s", "0.75", "--input-shape", "1,3,16,16", "-q"]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    warned = [line for line in err.splitlines() if "warning" in line]
    assert len(warned) == 1 and warned[0].startswith("sift-compile: warning: wide at s = 0.75 not applied as asked")
    code, _, err = run(argv + ["--strict", "--report", "r.json"], capsys)
    assert code == 2 and "sift-compile: error: wide at s = 0.75 not applied as asked" in err
    assert os.listdir(tmp_path) == []
