"""sift-check: 0 when every check holds, 1 with the list of failures, 2 on bad input (real engines)."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections import OrderedDict

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import numpy_helper

from sift_compiler.cli.check import main
from sift_compiler.variants import export_variants
from sift_compiler.exporters.weights import META_LAYERS, get_metadata
from checks import exit_status

SPEC = "test_cli_check:tiny_net"


def tiny_net() -> nn.Module:
    """Stem and head stay dense; the two middle convs are what Sparse-IFT rewrites."""
    return nn.Sequential(OrderedDict(
        stem=nn.Conv2d(3, 16, 3, padding=1), act=nn.ReLU(), mid=nn.Conv2d(16, 32, 3, padding=1),
        bn=nn.BatchNorm2d(32), act2=nn.ReLU(), mid2=nn.Conv2d(32, 32, 3, padding=1, stride=2), act3=nn.ReLU(),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), head=nn.Linear(32, 10)))


def run(argv) -> int:
    return exit_status(main, argv)


# one worker: the module's `exported` exports are made once, not once per worker
pytestmark = pytest.mark.xdist_group("cli-check")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The parallel s=0.75 export of tiny_net, as sift-bench makes it (seeded weights), and a compiled file."""
    out = tmp_path_factory.mktemp("check")
    (variant,) = export_variants(SPEC, ["parallel"], [0.75], str(out), input_shape=(1, 3, 16, 16), log=None,
                                 include_dense=False)
    import sift_compiler as sift
    from sift_compiler.capture.sources import load_model
    torch.manual_seed(0)
    source = load_model(SPEC, (1, 3, 16, 16))
    result = sift.compile(source.module, "parallel", 0.75, source.args, source.kwargs, source={"spec": SPEC})
    compiled = str(out / "tiny.sift.pt")
    result.save(compiled)
    return variant.model.path, compiled


def _copy(path: str, tmp_path, name: str) -> str:
    target = str(tmp_path / name)
    shutil.copy(path, target)
    return target


def _edit_largest_sparse_weight(path: str, edit) -> None:
    model = onnx.load(path)
    name = max(get_metadata(model, META_LAYERS), key=lambda r: np.prod(r["shape"]))["initializer"]
    for init in model.graph.initializer:
        if init.name == name:
            init.CopyFrom(numpy_helper.from_array(edit(numpy_helper.to_array(init).copy()), name))
    onnx.save(model, path)


def _sha(path: str) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.deepsparse
def test_a_good_file_passes_every_check(exported, tmp_path, capsys):
    path, _ = exported
    before = _sha(path)
    report = tmp_path / "check.json"
    assert run([path, "--require-deepsparse", "--min-supported-ops", "1.0", "--min-sparsity", "0.7",
                "--batch-size", "3", "--json", report]) == 0
    out = capsys.readouterr().out
    for name in ("onnx-checker", "sparsity", "min-sparsity", "onnxruntime-runs", "deepsparse-compiles",
                 "deepsparse-supported-ops", "deepsparse-vs-onnxruntime"):
        assert f"  {name} " in out
    assert "FAILED" not in out and "sift-check: all checks hold (1 file)" in out
    data = json.loads(report.read_text())
    assert data["ok"] is True and data["files"][0]["fraction_of_supported_ops"] == 1.0
    assert len(data["files"][0]["layers"]) == 8  # 2 Sparse Parallel layers x 4 branches (form auto, verified)
    assert _sha(path) == before  # DeepSparse compiled it for batch 3 without rewriting the file


@pytest.mark.deepsparse
@pytest.mark.parametrize("against", ["spec", "compiled"])
def test_against_the_torch_model_passes(exported, against, capsys):
    path, compiled = exported
    extra = (["--against", SPEC, "--transform", "parallel", "--sparsity", "0.75"] if against == "spec"
             else ["--against", compiled, "--trust-source"])
    assert run([path, *extra]) == 0
    assert re.search(r"\n  onnxruntime-vs-torch +ok +max abs error", capsys.readouterr().out)


def test_destroyed_zeros_fail(exported, tmp_path, capsys):
    path = _copy(exported[0], tmp_path, "dense-again.onnx")
    _edit_largest_sparse_weight(path, lambda w: np.where(w == 0, np.float32(1e-3), w))
    assert run([path, "--no-deepsparse"]) == 1
    err = capsys.readouterr().err
    assert "1 check(s) failed" in err and "zeros destroyed" in err


@pytest.mark.deepsparse
def test_changed_outputs_fail_against_the_torch_model(exported, tmp_path, capsys):
    path = _copy(exported[0], tmp_path, "changed.onnx")
    _edit_largest_sparse_weight(path, lambda w: w * np.float32(3.0))  # zeros kept, values wrong
    assert run([path, "--against", SPEC, "--transform", "parallel", "--sparsity", "0.75"]) == 1
    err = capsys.readouterr().err
    assert "onnxruntime-vs-torch: max abs error" in err and "sparsity" not in err


def test_min_sparsity_fails_below_and_uses_all_middle_weights_without_metadata(exported, tmp_path, capsys):
    path = exported[0]
    assert run([path, "--no-deepsparse", "--min-sparsity", "0.9"]) == 1
    assert "min-sparsity: 8 of 8 sparse layers below 0.9" in capsys.readouterr().err
    stripped = _copy(path, tmp_path, "stripped.onnx")
    model = onnx.load(stripped)
    del model.metadata_props[:]
    onnx.save(model, stripped)
    assert run([stripped, "--no-deepsparse"]) == 0
    assert re.search(r"\n  sparsity +skipped +no sift layer records", capsys.readouterr().out)
    assert run([stripped, "--no-deepsparse", "--min-sparsity", "0.7"]) == 0
    assert "weights (all but the first and last) >= 0.7" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing", "not-onnx", "truncated", "wrong-shape", "wrong-rank", "no-against",
                                  "bad-spec"])
def test_bad_input_exits_2_with_one_clear_line(exported, tmp_path, capsys, case):
    path = exported[0]
    argv = {
        "missing": [tmp_path / "nope.onnx"],
        "not-onnx": [tmp_path / "notes.onnx"],
        "truncated": [tmp_path / "cut.onnx"],
        "wrong-shape": [path, "--input-shape", "1,4,16,16"],
        "wrong-rank": [path, "--input-shape", "1,3,16"],
        "no-against": [path, "--transform", "parallel"],
        "bad-spec": [path, "--against", "torchvision:resnet1800"],
    }[case]
    (tmp_path / "notes.onnx").write_text("these are not the weights you are looking for\n")
    data = open(path, "rb").read()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    assert run(argv) == 2
    err = capsys.readouterr().err.strip()
    expected = {
        "missing": "does not exist", "not-onnx": "is not a readable ONNX model",
        "truncated": "is not a readable ONNX model (truncated or not ONNX: DecodeError",
        "wrong-shape": "input shape 1,4,16,16 does not fit the model's input input [batch, 3, 16, 16] float32",
        "wrong-rank": "input shape 1,3,16 does not fit", "no-against": "pass --against MODEL",
        "bad-spec": "unknown torchvision model 'resnet1800'",
    }[case]
    assert expected in err
    assert "Traceback" not in err
