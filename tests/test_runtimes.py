"""The runtimes after DeepSparse: OpenVINO and torch in sift-bench, and sift-compile / sift-check on a
Python where DeepSparse cannot be imported (a child process whose sitecustomize blocks the import,
as on Python >= 3.12: the real code paths, nothing of ours replaced)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

from sift_compiler.cli.bench import main as bench_main
from sift_compiler.exporters.runtimes import engine_status, open_engine
from sift_compiler.variants import export_variants
from checks import exit_status

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
SPEC = "test_cli_check:tiny_net"
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
BLOCK = textwrap.dedent("""\
    import sys
    class _NoDeepSparse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "deepsparse":
                raise ModuleNotFoundError("No module named 'deepsparse'")
    sys.meta_path.insert(0, _NoDeepSparse())
    """)


# one worker: the module's `wide` exports are made once, not once per worker
pytestmark = pytest.mark.xdist_group("runtimes")


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """tiny_net Sparse Wide 0.75: ONNX plus the compiled model beside it (as sift-compile -o writes it)."""
    out = tmp_path_factory.mktemp("runtimes")
    (variant,) = export_variants(SPEC, ["wide"], [0.75], str(out), input_shape=(1, 3, 16, 16), include_dense=False,
                                 save_compiled=True, deepsparse="skip")
    return variant.model


def test_bench_times_each_runtime_that_loads_the_file(wide, tmp_path, capsys):
    engines = "onnxruntime,openvino,torch,torch-csr"   # openvino-sparse and torch-compile: benchmarks/cpu_runtimes.py
    out = tmp_path / "bench.json"
    assert exit_status(bench_main, [wide.path, "--runtime", engines, "-b", "2", "-n", "2", "-w", "0",
                                    "--no-progress", "--trust-source", "--json", out]) == 0
    results = {r["engine"]: r for r in json.loads(out.read_text())["results"]}
    expected = [e for e in engines.split(",") if engine_status(e)[0]]
    assert sorted(results) == sorted(expected)
    assert all(len(r["latencies_ms"]) == 2 and not r["error"] for r in results.values())
    if not HAS_OPENVINO:
        assert "openvino left out: openvino is not installed" in capsys.readouterr().err


def test_runtimes_agree_on_the_outputs(wide):
    """Every runtime computes the same function: onnxruntime against OpenVINO, torch eager and torch CSR."""
    import numpy as np
    from sift_compiler.exporters.checks import compare_outputs
    from sift_compiler.exporters.inputs import input_specs, random_feeds
    from sift_compiler.exporters.weights import load_onnx
    from sift_compiler import load
    feeds = random_feeds(input_specs(load_onnx(wide.path)), 3)
    module = load(wide.torch_path, trust_source=True).module   # tiny_net is this test suite's code
    with open_engine("onnxruntime", wide.path, 3) as ort:
        expected = ort.run(feeds)
    for name in ("openvino", "torch", "torch-csr"):
        if not engine_status(name)[0]:
            continue
        with open_engine(name, wide.path, 3, input_shapes=[list(v.shape) for v in feeds.values()],
                         module=module) as engine:
            got = engine.run(feeds)
        assert len(got) == len(expected) and all(isinstance(g, np.ndarray) for g in got)
        assert compare_outputs(got, expected).rel < 1e-4, name


def test_a_file_without_its_torch_model_is_a_skipped_row(wide, tmp_path, capsys):
    alone = tmp_path / "alone.onnx"
    alone.write_bytes(open(wide.path, "rb").read())
    assert exit_status(bench_main, [alone, "--runtime", "onnxruntime,torch", "-b", "1", "-n", "1", "-w", "0",
                                    "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "skipped: alone on torch: torch runs the compiled torch model" in out and "alone.sift.pt" in out


def test_compile_and_check_without_deepsparse_say_so_in_one_line(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCK)
    onnx_path, report = tmp_path / "m.onnx", tmp_path / "check.json"
    code = textwrap.dedent(f"""\
        import sys
        from sift_compiler.cli import check, compile
        a = compile.main([{SPEC!r}, "-t", "wide", "-s", "0.75", "--input-shape", "1,3,16,16", "-q",
                          "--onnx", {str(onnx_path)!r}])
        b = check.main([{str(onnx_path)!r}, "--json", {str(report)!r}])
        sys.exit(10 * a + b)
        """)
    env = dict(os.environ, OMP_NUM_THREADS="1", NM_DISABLE_ANALYTICS="1",
               PYTHONPATH=os.pathsep.join([str(tmp_path), TESTS, ROOT]))
    done = subprocess.run([sys.executable, "-c", code], cwd=TESTS, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    others = "onnxruntime and openvino" if HAS_OPENVINO else "onnxruntime"
    for prog in ("sift-compile", "sift-check"):
        lines = [line for line in done.stderr.splitlines() if "DeepSparse was not there" in line]
        mine = [line for line in lines if line.startswith(f"{prog}: ")]
        assert len(mine) == 1, done.stderr
        assert "DeepSparse is not installed" in mine[0] and mine[0].endswith(f"checked on {others} instead")
    checks = {c["name"]: c for c in json.loads(report.read_text())["files"][0]["checks"]}
    assert checks["deepsparse-compiles"]["skipped"]
    if HAS_OPENVINO:
        assert checks["openvino-vs-onnxruntime"]["ok"] and not checks["openvino-vs-onnxruntime"]["skipped"]
