"""DeepSparse runs in a child process: a native abort, a kill or a hang there is one line, never the caller's end.

tests/data/deepsparse_abort.onnx (3.6 KB) makes DeepSparse 1.8's compiler abort
(``Assertion at ./src/include/wand/engine/compute/planner.hpp:70``, then a page of backtrace): a
Sparse Doped Linear (conv 3->8, global pooling, Linear 8->16 doped at 0.75, Linear 16->4), exported
as trained with ``deepsparse="skip"``. The same shape killed sift-compile on torchvision's
mobilenet_v3_small. If a DeepSparse release stops aborting on it, the first test fails: find
another file, do not drop the test.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import sift_compiler as sift
from sift_compiler.cli.bench import main as bench_main
from sift_compiler.cli.check import main as check_main
from sift_compiler.exporters.onnx import export_onnx
from sift_compiler.exporters.runtimes import EngineCrash, open_engine
from checks import exit_status

pytestmark = pytest.mark.deepsparse
ABORT = str(Path(__file__).parent / "data" / "deepsparse_abort.onnx")
PLANNER = "Assertion at ./src/include/wand/engine/compute/planner.hpp:70"


def doped_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16), nn.Hardswish(),
                         nn.Linear(16, 4)).eval()


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("worker") / "good.onnx")
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    result = sift.compile(net, "none", 0.0, (torch.randn(1, 3, 8, 8),))
    export_onnx(result.module, (torch.randn(1, 3, 8, 8),), path, deepsparse="skip")
    return path


def test_a_native_abort_is_one_line_and_the_caller_goes_on(good_file, capfd):
    with pytest.raises(EngineCrash) as caught:
        open_engine("deepsparse", ABORT, 1)
    message = str(caught.value)
    assert "\n" not in message and message.endswith(f"DeepSparse aborted (exit status 1): {PLANNER}")
    out, err = capfd.readouterr()
    assert "Backtrace" not in out + err and "support@neuralmagic.com" not in out + err
    with open_engine("deepsparse", good_file, 2) as engine:  # this process, and DeepSparse, still work
        x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
        assert engine.run({"input": x})[0].shape == (2, 4)


def test_sift_check_reports_the_abort_as_a_failed_check(capfd):
    assert exit_status(check_main, [ABORT]) == 1
    out, err = capfd.readouterr()
    assert f"deepsparse-compiles: DeepSparse cannot compile {ABORT}: DeepSparse aborted" in err and PLANNER in err
    assert "Backtrace" not in out + err


def test_a_worker_killed_by_a_signal_is_one_line(good_file):
    engine = open_engine("deepsparse", good_file, 1)
    os.kill(engine.impl.pid, signal.SIGKILL)
    x = np.zeros((1, 3, 8, 8), np.float32)
    with pytest.raises(EngineCrash, match=r"^DeepSparse worker killed by signal 9 \(SIGKILL; out of memory\?\)$"):
        engine.run({"input": x})
    engine.close()


def test_a_worker_that_does_not_answer_in_time_is_killed(good_file):
    with pytest.raises(EngineCrash, match=r"no answer from DeepSparse within 0.001 s \(compile\); worker killed$"):
        open_engine("deepsparse", good_file, 1, timeout_s=0.001)


def test_sift_bench_marks_the_row_failed_and_times_the_rest(good_file, capsys):
    code = exit_status(bench_main, [good_file, ABORT, "--engines", "deepsparse", "--batch-size", "1",
                                    "--iterations", "2", "--warmup", "0", "--no-progress"])
    assert code == 1
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("good", "deepsparse_abort"))}
    assert rows["good"][3] != "FAILED" and float(rows["good"][3]) > 0
    assert rows["deepsparse_abort"][3] == "FAILED"
    assert f"FAILED: deepsparse_abort on deepsparse: DeepSparse cannot compile {ABORT}: DeepSparse aborted" in out


def test_the_export_remedies_the_abort(tmp_path):
    """The exporter meets the abort on the trained form and writes Doped Linears as one matmul instead."""
    x = torch.randn(1, 3, 8, 8)
    result = sift.compile(doped_net(), "doped", 0.75, (x,))
    info = export_onnx(result.module, (x,), str(tmp_path / "doped.onnx"), deepsparse="require")
    assert info.outcome == "remedied" and info.verification.ok, info.verification.table()
    assert info.notes[0].startswith("DeepSparse failed on 1 Sparse Doped Linear layers as trained (deepsparse-compiles")
    assert PLANNER in info.notes[0] and info.notes[0].endswith("exported as one matmul over [x, U x] instead")
    assert info.verification.errors["deepsparse-vs-onnxruntime"].rel < 1e-5
    assert os.listdir(tmp_path) == ["doped.onnx"]
