"""The support matrix, generated from runs: every model family of ``tests/families.py`` (tiny
config, random weights) compiled with every transform, written to docs/support.md and raw JSON.

Each (family, transform) runs in a child process with a time limit, so a crash or a hang is one
row ("refused: the child died / timed out"), never the end of the run. A cell is

    full      the result is the user's class (native form), iso-FLOP (VerifyPass checked it) and
              applied as asked (no SiftWarning), at every sparsity of the row
    partial   compiled and iso-FLOP, but in the graph form or not as asked: the first reason
    refused   sift.compile raised (the error's first line), or the child died or timed out
    skipped   the family's library is not installed

plus the iso-FLOP ratio per sparsity, the form and whether the native model exports to ONNX and
matches torch in onnxruntime (rtol 1e-3).

    python benchmarks/support_matrix.py                          # every family, 0.5 and 0.9 (about 20 min, 2 cores)
    python benchmarks/support_matrix.py --families gpt2,qwen3 --transforms wide --sparsities 0.5
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

TRANSFORMS = ("wide", "parallel", "factorized", "doped")
SPARSITIES = (0.5, 0.9)
STATUS_ORDER = ("refused", "partial", "full")  # a row is the worst of its cells


def _first_line(text: str, limit: int = 240) -> str:
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _onnx_check(module, case, out_dir: str) -> Dict[str, Any]:
    """Export the compiled model and compare onnxruntime with torch; yes, or no with the reason."""
    import numpy as np
    import onnxruntime as ort
    import torch
    import torch.utils._pytree as pytree
    import sift_compiler as sift
    path = os.path.join(out_dir, "model.onnx")
    leaves = lambda out: [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]  # noqa: E731
    try:
        module.eval()
        with torch.no_grad():
            expected = [t.numpy() for t in leaves(module(*case.args, **case.kwargs))]
        info = sift.export_onnx(module, case.args, path, case.kwargs, verify=False)
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        feed = {n: t.numpy() for n, t in zip(info.input_names, leaves((case.args, case.kwargs)))}
        got = session.run(None, feed)
        for a, e in zip(got, expected):
            np.testing.assert_allclose(a, e, rtol=1e-3, atol=1e-4 * max(1.0, float(np.abs(e).max())))
        return {"onnx": True}
    except Exception as e:  # any exporter or runtime failure is this cell's answer, not the run's end
        return {"onnx": False, "onnx_reason": f"{type(e).__name__}: {_first_line(e)}"}
    finally:
        for name in os.listdir(out_dir):
            os.unlink(os.path.join(out_dir, name))


def run_cell(family: str, transform: str, sparsity: float, onnx: bool) -> Dict[str, Any]:
    """Compile one family with one transform at one sparsity (in this process)."""
    import torch
    import sift_compiler as sift
    from sift_compiler.errors import SiftWarning
    from families import FAMILIES
    cell: Dict[str, Any] = {"sparsity": sparsity}
    torch.manual_seed(0)
    case = FAMILIES[family].build()
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SiftWarning)
        try:
            result = sift.compile(case.model, transform, sparsity, case.args, case.kwargs)
        except Exception as e:  # the refusal is the cell's content
            cell.update(status="refused", reason=f"{type(e).__name__}: {_first_line(e)}",
                        seconds=round(time.perf_counter() - start, 2))
            return cell
    cell["seconds"] = round(time.perf_counter() - start, 2)
    shortfalls = [_first_line(w.message) for w in caught if issubclass(w.category, SiftWarning)]
    cell.update(form=result.output, flop_ratio=result.report.flop_ratio, notes=list(result.report.notes),
                warnings=shortfalls)
    if result.output != "native":
        reason = next((n for n in result.report.notes if n.startswith("graph form")), "graph form")
        cell.update(status="partial", reason=_first_line(reason))
    elif shortfalls:
        cell.update(status="partial", reason=shortfalls[0])
    else:
        cell.update(status="full")
    if onnx:
        with tempfile.TemporaryDirectory() as out_dir:
            cell.update(_onnx_check(result.module, case, out_dir))
    return cell


def _child(args) -> int:
    # ONNX at the first sparsity only: the exporter does not see the sparsity, only the graph's shape
    cells = [run_cell(args.child[0], args.child[1], float(s), not args.no_onnx and i == 0)
             for i, s in enumerate(args.sparsities.split(","))]
    with open(args.result, "w") as f:
        json.dump(cells, f)
    return 0


def run_row(family: str, transform: str, sparsities: Sequence[float], timeout: float, onnx: bool) -> Dict[str, Any]:
    """One (family, transform) row, in a child process with a time limit."""
    from families import FAMILIES
    row: Dict[str, Any] = {"family": family, "transform": transform, "kind": FAMILIES[family].kind,
                           "note": FAMILIES[family].note}
    missing = FAMILIES[family].missing
    if missing:
        return dict(row, status="skipped", reason=missing, cells=[])
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "cells.json")
        command = [sys.executable, os.path.abspath(__file__), "--child", family, transform, "--result", result,
                   "--sparsities", ",".join(map(str, sparsities))] + (["--no-onnx"] if not onnx else [])
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                   PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
        start = time.perf_counter()
        try:
            run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return dict(row, status="refused", reason=f"timed out after {timeout:.0f} s", cells=[],
                        seconds=round(time.perf_counter() - start, 1))
        row["seconds"] = round(time.perf_counter() - start, 1)
        if run.returncode != 0 or not os.path.exists(result):
            tail = [line for line in run.stderr.strip().splitlines() if line.strip()][-1:] or ["no output"]
            return dict(row, status="refused", reason=f"the child died (exit {run.returncode}): {_first_line(tail[0])}",
                        cells=[])
        with open(result) as f:
            cells = json.load(f)
    worst = min(cells, key=lambda c: STATUS_ORDER.index(c["status"]))
    row.update(status=worst["status"], reason=worst.get("reason", ""), cells=cells)
    return row


def _ratio(cell: Dict[str, Any]) -> str:
    return f"{cell['flop_ratio']:.4f}" if "flop_ratio" in cell else "-"


def _onnx(cells: List[Dict[str, Any]]) -> str:
    answers = [c.get("onnx") for c in cells if "onnx" in c]
    if not answers:
        return "-"
    if all(answers):
        return "yes"
    reason = next(c["onnx_reason"] for c in cells if c.get("onnx") is False)
    return f"no ({reason})"


def to_markdown(rows: List[Dict[str, Any]], sparsities: Sequence[float], command: str,
                planned: Optional[int] = None) -> str:
    """docs/support.md: one table row per (family, transform), generated, never edited by hand."""
    counts = {s: sum(r["status"] == s for r in rows) for s in ("full", "partial", "refused", "skipped")}
    lines = ["# Support matrix", "",
             f"Generated by `{command}` from its runs; do not edit by hand (raw results: "
             "`docs/results/support_matrix.json`). Tiny configs with random weights (`tests/families.py`).", "",
             "**full**: the result is the model's own class (native form), iso-FLOP and applied as asked at every "
             "sparsity; **partial**: compiled and iso-FLOP, but in the graph form or not applied as asked "
             "(a `SiftWarning`, an error under `--strict`): the first reason; **refused**: `sift.compile` "
             "raised (its first line); **skipped**: the library is not installed. ONNX: the native model "
             "exported with `sift.export_onnx` matches torch in onnxruntime (rtol 1e-3).", "",
             "Totals: " + ", ".join(f"{counts[s]} {s}" for s in counts if counts[s])
             + (f" ({len(rows)} of {planned} rows run)" if planned and planned != len(rows) else "") + ".", "",
             "ONNX is exported at the first sparsity of a row; where it says no, the reason is the "
             "exporter's (the compiled model still runs in torch).", "",
             "| family | transform | status | " + " | ".join(f"ratio s={s}" for s in sparsities)
             + " | form | ONNX | reason |",
             "|---|---|---|" + "---|" * len(sparsities) + "---|---|---|"]
    for r in rows:
        by_s = {c["sparsity"]: c for c in r.get("cells", [])}
        ratios = " | ".join(_ratio(by_s.get(s, {})) for s in sparsities)
        forms = sorted({c["form"] for c in r.get("cells", []) if "form" in c}) or ["-"]
        name = r["family"] + (f" ({r['note']})" if r.get("note") else "")
        reason = r.get("reason", "").replace("|", "\\|")
        lines.append(f"| {name} | {r['transform']} | {r['status']} | {ratios} | {'/'.join(forms)} | "
                     f"{_onnx(r.get('cells', [])).replace('|', chr(92) + '|')} | {reason} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    from families import FAMILIES
    from sift_compiler.io import write_text
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated names (tests/families.py)")
    parser.add_argument("--transforms", default=",".join(TRANSFORMS))
    parser.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)))
    parser.add_argument("--timeout", type=float, default=600, help="seconds per (family, transform) child")
    parser.add_argument("--no-onnx", action="store_true", help="do not export to ONNX")
    parser.add_argument("--jobs", type=int, default=1, help="rows run at once (each in its own process)")
    parser.add_argument("--markdown", default=os.path.join(ROOT, "docs", "support.md"))
    parser.add_argument("--json", default=os.path.join(ROOT, "docs", "results", "support_matrix.json"))
    parser.add_argument("--child", nargs=2, metavar=("FAMILY", "TRANSFORM"), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args)
    families = [f for f in args.families.split(",") if f]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown families {unknown}; known: {', '.join(FAMILIES)}")
    transforms = [t for t in args.transforms.split(",") if t]
    sparsities = [float(s) for s in args.sparsities.split(",")]
    work = [(family, transform) for family in families for transform in transforms]
    command = "python benchmarks/support_matrix.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    done: Dict[Tuple[str, str], Dict[str, Any]] = {}
    start = time.perf_counter()

    def one(item):
        return item, run_row(item[0], item[1], sparsities, args.timeout, not args.no_onnx)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:  # each row is a child process
        for (family, transform), row in pool.map(one, work):
            done[(family, transform)] = row
            print(f"[{len(done)}/{len(work)}] {family} {transform}: {row['status']}"
                  f"{' (' + row['reason'] + ')' if row.get('reason') else ''} {row.get('seconds', 0):.1f}s", flush=True)
            rows = [done[w] for w in work if w in done]  # written after every row: an interrupted run keeps its rows
            write_text(args.markdown, to_markdown(rows, sparsities, command.strip(), len(work)))
            write_text(args.json, json.dumps({"command": command.strip(), "sparsities": sparsities,
                                              "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.markdown} and {args.json} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
