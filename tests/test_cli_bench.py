"""sift-bench on real engines: files and model specs, table, JSON, plot, and life without DeepSparse."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sift_compiler.cli.bench import main
from sift_compiler.variants import export_variants
from checks import exit_status
from test_cli_check import tiny_net  # noqa: F401  (the spec below imports it from this module)

SPEC = "test_cli_bench:tiny_net"
TESTS = Path(__file__).parent
QUICK = ["--batch-size", "2", "--iterations", "3", "--warmup", "1", "--no-progress"]


def run(argv) -> int:
    return exit_status(main, argv)


# one worker: the module's `files` exports are made once, not once per worker
pytestmark = pytest.mark.xdist_group("cli-bench")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    variants = export_variants(SPEC, ["parallel"], [0.5, 0.9], str(out), input_shape=(1, 3, 16, 16), log=None)
    return [v.model.path for v in variants]


def _rows(out: str):
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("model "))
    return lines[start], [line.split() for line in lines[start + 2:] if line and not line.startswith("note:")]


@pytest.mark.deepsparse
def test_files_on_both_engines_give_table_json_and_plot(files, tmp_path, capsys):
    report, plot = tmp_path / "bench.json", tmp_path / "fig3.png"
    assert run([*files, *QUICK, "--rounds", "2", "--json", report, "--plot", plot]) == 0
    header, rows = _rows(capsys.readouterr().out)
    assert "DS median ms" in header and "ORT p90 ms" in header and "DS speedup over ORT" in header
    assert [r[0] for r in rows] == ["tiny_net-dense", "tiny_net-parallel-0.50", "tiny_net-parallel-0.90"]
    assert rows[0][1:3] == ["none", "0.00"] and rows[2][1:3] == ["parallel", "0.90"]
    data = json.loads(report.read_text())
    results = data["results"]
    assert len(results) == 6 and {r["engine"] for r in results} == {"deepsparse", "onnxruntime"}
    for r in results:
        assert len(r["latencies_ms"]) == 2 * 3 and 0 < r["median_ms"] <= r["p90_ms"] and r["items_per_s"] > 0
        assert r["batch_size"] == 2
    assert all(r["fraction_of_supported_ops"] == 1.0 for r in results if r["engine"] == "deepsparse")
    assert data["machine"]["logical_cores"] and data["settings"]["iterations"] == 3 and data["settings"]["rounds"] == 2
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.deepsparse
def test_model_spec_compiles_exports_and_benchmarks_the_dense_baseline_too(tmp_path, capsys):
    out_dir = tmp_path / "models"
    assert run([SPEC, "--transform", "parallel", "--sparsity", "0.5", "--input-shape", "1,3,16,16",
                "--engines", "deepsparse", "--out-dir", out_dir, *QUICK]) == 0
    captured = capsys.readouterr()
    header, rows = _rows(captured.out)
    assert [r[0] for r in rows] == ["tiny_net-dense", "tiny_net-parallel-0.50"]
    assert rows[0][6] == "1.00" and float(rows[1][6]) >= 0  # "DS vs dense": the dense model against itself
    assert sorted(p.name for p in out_dir.iterdir()) == ["tiny_net-dense.onnx", "tiny_net-parallel-0.50.onnx"]
    assert "sift: compiling and exporting tiny_net-parallel-0.50" in captured.err


def test_without_deepsparse_it_says_how_to_install_and_runs_onnxruntime(files):
    """A Python where `import deepsparse` fails, as on Python 3.12 or a machine without the extra."""
    code = ("import sys; sys.modules['deepsparse'] = None; from sift_compiler.cli.bench import main; "
            f"sys.exit(main({[files[0], *QUICK]!r}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=TESTS, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "pip install 'sift-compiler[deepsparse]'" in done.stderr
    assert "running onnxruntime alone" in done.stderr
    header, rows = _rows(done.stdout)
    assert "ORT median ms" in header and "DS" not in header and len(rows) == 1


@pytest.mark.parametrize("argv, message", [
    ([SPEC], "--sparsity is required to compile test_cli_bench:tiny_net"),
    (["missing.onnx"], "ONNX file 'missing.onnx' does not exist"),
    (["x.onnx", "--engines", "tensorrt"], "--runtime 'tensorrt': choose from deepsparse, onnxruntime, openvino"),
    ([SPEC, "--transform", "wider", "--sparsity", "0.5"], "unknown transform 'wider'"),
    (["x.onnx", "--batch-size", "0"], "--batch-size must be at least 1"),
], ids=["spec-without-sparsity", "missing-file", "unknown-engine", "unknown-transform", "zero-batch"])
def test_bad_input_exits_2(argv, message, capsys):
    assert run(argv) == 2
    assert message in capsys.readouterr().err
