"""The support matrix, generated from runs: every model family of ``tests/families.py`` (tiny
config, random weights) compiled with every transform, written to docs/support.md and raw JSON.

Each (family, transform) runs in a child process with a time limit, so a crash or a hang is one
row ("refused: the child died / timed out"), never the end of the run. A cell is

    full      the result is the user's class (native form), iso-FLOP, applied as asked (no
              SiftWarning) and passes every check below, at every sparsity of the row
    partial   compiled and iso-FLOP, but in the graph form, not as asked, or a check failed
              (native=graph, generate, RigL counts): the first reason
    refused   sift.compile raised (the error's first line), the recounted FLOPs are not
              iso-FLOP, or the child died or timed out
    skipped   the family's library is not installed

The checks of every cell are those the tests use (tests/checks.py): iso-FLOP recounted on the
masks within the rounding bound (per token, active experts, for a mixture of experts); the native
model computes what the graph form computes at a batch the compiler did not check; a causal LM's
or encoder-decoder's generate() with the cache decodes what a full recompute decodes; four RigL
steps keep every masked layer's (every expert's) exact count. "n/a" where a check does not apply
(generate on an encoder or vision model; native=graph and generate on the graph form). ONNX (at
the first sparsity of a row): the native model exports and onnxruntime matches torch (rtol 1e-3);
where it does not, the exporter's reason (not a status: the model still runs in torch).

    python benchmarks/support_matrix.py                          # every family, 0.5 and 0.9 (about 25 min, 2 cores)
    python benchmarks/support_matrix.py --families gpt2,qwen3 --transforms wide --sparsities 0.5 --update
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
GENERATES = ("causal", "seq2seq")  # the family kinds whose generate() is checked
CHECK_COLUMNS = (("native_graph", "native=graph"), ("generate", "generate"), ("rigl", "RigL counts"))


def _first_line(text: str, limit: int = 240) -> str:
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _check(name: str, check, *args) -> Tuple[Optional[bool], str]:
    """Run one check of tests/checks.py: (True, ""), or (False, its first line) when it fails."""
    try:
        check(*args)
        return True, ""
    except Exception as e:  # a failing check (AssertionError) or one that crashed is this cell's answer
        prefix = "" if isinstance(e, AssertionError) else f"{type(e).__name__}: "
        return False, f"{name}: {prefix}{_first_line(e) or type(e).__name__}"


def _run_checks(result, case, kind: str, onnx: bool) -> Dict[str, Any]:
    """The cell's checks, in an order that leaves RigL (it trains the model) last."""
    from checks import (assert_generate_equals_recompute, assert_iso_flop, assert_native_equals_graph,
                        assert_onnx_matches, assert_rigl_keeps_exact_counts)
    native = result.output == "native"
    checks: Dict[str, Optional[bool]] = {}
    reasons: Dict[str, str] = {}

    def record(name, applies, check, *args):
        checks[name], reason = _check(name, check, *args) if applies else (None, "")
        if reason:
            reasons[name] = reason
    record("iso_flop", True, assert_iso_flop, result)
    record("native_graph", native, assert_native_equals_graph, result, case)
    record("generate", native and kind in GENERATES, assert_generate_equals_recompute, result.module, kind,
           case.kwargs)
    out: Dict[str, Any] = {}
    if onnx:
        with tempfile.TemporaryDirectory() as out_dir:
            ok, reason = _check("onnx", assert_onnx_matches, result.module, case, os.path.join(out_dir, "model.onnx"))
        out.update({"onnx": ok} if ok else {"onnx": False, "onnx_reason": reason[len("onnx: "):]})
    record("rigl", True, assert_rigl_keeps_exact_counts, result.module, case)
    return dict(out, checks=checks, check_reasons=reasons)


def run_cell(family: str, transform: str, sparsity: float, onnx: bool) -> Dict[str, Any]:
    """Compile one family with one transform at one sparsity and check it (in this process)."""
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
    cell.update(_run_checks(result, case, FAMILIES[family].kind, onnx))
    failed = [cell["check_reasons"][name] for name, ok in cell["checks"].items() if ok is False]
    if failed:  # not iso-FLOP is a refusal; another failing check makes the cell partial at best
        worst = "refused" if cell["checks"]["iso_flop"] is False else "partial"
        if STATUS_ORDER.index(worst) < STATUS_ORDER.index(cell["status"]):
            cell.update(status=worst, reason=failed[0])
        else:
            cell["reason"] = "; ".join([cell["reason"], *failed])
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
    if "flop_ratio" not in cell:
        return "-"
    failed = cell.get("checks", {}).get("iso_flop") is False
    return f"{cell['flop_ratio']:.4f}" + (" (not iso-FLOP)" if failed else "")


def _check_column(cells: List[Dict[str, Any]], name: str) -> str:
    """yes (every cell passed), n/a (applies to none), no (the first failure, at its sparsity) or -."""
    answers = [(c, c["checks"].get(name)) for c in cells if "checks" in c]
    if not answers:
        return "-"
    failed = [(c, ok) for c, ok in answers if ok is False]
    if failed:
        cell = failed[0][0]
        return f"no (s={cell['sparsity']}: {cell['check_reasons'][name].split(': ', 1)[-1]})"
    return "yes" if any(ok for _, ok in answers) else "n/a"


def _onnx(cells: List[Dict[str, Any]]) -> str:
    answers = [c.get("onnx") for c in cells if "onnx" in c]
    if not answers:
        return "-"
    if all(answers):
        return "yes"
    reason = next(c["onnx_reason"] for c in cells if c.get("onnx") is False)
    return f"no ({reason})"


def _cell_text(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(rows: List[Dict[str, Any]], sparsities: Sequence[float], command: str,
                planned: Optional[int] = None, updates: Sequence[str] = ()) -> str:
    """docs/support.md: one table row per (family, transform), generated, never edited by hand."""
    counts = {s: sum(r["status"] == s for r in rows) for s in ("full", "partial", "refused", "skipped")}
    updated = "".join(f"; rows updated by `{u}`" for u in updates)
    lines = ["# Support matrix", "",
             f"Generated by `{command}`{updated} from its runs; do not edit by hand (raw results: "
             "`docs/results/support_matrix.json`). Tiny configs with random weights (`tests/families.py`).", "",
             "**full**: the result is the model's own class (native form), iso-FLOP, applied as asked and passes "
             "every check at every sparsity; **partial**: compiled and iso-FLOP, but in the graph form, not applied "
             "as asked (a `SiftWarning`, an error under `--strict`) or a check failed: the first reason; "
             "**refused**: `sift.compile` raised (its first line) or the recounted FLOPs are not iso-FLOP; "
             "**skipped**: the library is not installed.", "",
             "Checks (`tests/checks.py`, the tests' own): **ratio** sift/dense weight FLOPs, recounted on the masks "
             "and held to the rounding bound (per token counting active experts for a mixture of experts); "
             "**native=graph**: the native model computes what the graph form computes at a batch the compiler "
             "did not check; **generate**: `generate()` with the cache decodes what a full recompute decodes "
             "(causal LMs and encoder-decoders); **RigL counts**: four RigL steps keep every masked layer's "
             "(every expert's) exact count; n/a where a check does not apply. **ONNX** (at the first sparsity "
             "of a row): the native model exported with `sift.export_onnx` matches torch in onnxruntime "
             "(rtol 1e-3); where it says no, the reason is the exporter's (the compiled model still runs in torch).",
             "",
             "Totals: " + ", ".join(f"{counts[s]} {s}" for s in counts if counts[s])
             + (f" ({len(rows)} of {planned} rows run)" if planned and planned != len(rows) else "") + ".", "",
             "| family | transform | status | " + " | ".join(f"ratio s={s}" for s in sparsities)
             + " | form | " + " | ".join(title for _, title in CHECK_COLUMNS) + " | ONNX | reason |",
             "|---|---|---|" + "---|" * len(sparsities) + "---|" * (len(CHECK_COLUMNS) + 3)]
    for r in rows:
        cells = r.get("cells", [])
        by_s = {c["sparsity"]: c for c in cells}
        ratios = " | ".join(_ratio(by_s.get(s, {})) for s in sparsities)
        forms = sorted({c["form"] for c in cells if "form" in c}) or ["-"]
        name = r["family"] + (f" ({r['note']})" if r.get("note") else "")
        checks = " | ".join(_cell_text(_check_column(cells, key)) for key, _ in CHECK_COLUMNS)
        lines.append(f"| {name} | {r['transform']} | {r['status']} | {ratios} | {'/'.join(forms)} | {checks} | "
                     f"{_cell_text(_onnx(cells))} | {_cell_text(r.get('reason', ''))} |")
    return "\n".join(lines) + "\n"


def _previous(path: str) -> Dict[str, Any]:
    """The JSON an ``--update`` merges into (empty when there is none yet)."""
    if not os.path.exists(path):
        return {"rows": [], "sparsities": []}
    with open(path) as f:
        return json.load(f)


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
    parser.add_argument("--update", action="store_true",
                        help="merge the rows run into the existing JSON and markdown (the other rows stay)")
    parser.add_argument("--out-dir", help="write support.md and support_matrix.json here instead of docs/")
    parser.add_argument("--markdown", default=os.path.join(ROOT, "docs", "support.md"))
    parser.add_argument("--json", default=os.path.join(ROOT, "docs", "results", "support_matrix.json"))
    parser.add_argument("--child", nargs=2, metavar=("FAMILY", "TRANSFORM"), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args)
    if args.out_dir:
        args.markdown = os.path.join(args.out_dir, "support.md")
        args.json = os.path.join(args.out_dir, "support_matrix.json")
    families = [f for f in args.families.split(",") if f]
    transforms = [t for t in args.transforms.split(",") if t]
    for what, names, known in (("family", families, list(FAMILIES)), ("transform", transforms, TRANSFORMS)):
        unknown = [n for n in names if n not in known]
        if unknown:
            print(f"support_matrix.py: unknown {what} {', '.join(unknown)}; known: {', '.join(known)}", file=sys.stderr)
            return 2
    sparsities = [float(s) for s in args.sparsities.split(",")]
    work = [(family, transform) for family in families for transform in transforms]
    command = ("python benchmarks/support_matrix.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    previous = _previous(args.json) if args.update else {"rows": [], "sparsities": []}
    kept = {(r["family"], r["transform"]): r for r in previous["rows"]}
    header = previous.get("command", command) if args.update else command
    updates = previous.get("updates", []) + [command] if args.update and previous["rows"] else []
    shown = sorted(set(previous["sparsities"]) | set(sparsities))
    order = {key: i for i, key in enumerate((f, t) for f in FAMILIES for t in TRANSFORMS)}
    planned = sorted(set(kept) | set(work), key=lambda key: order.get(key, len(order)))
    for path in (args.markdown, args.json):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    done: Dict[Tuple[str, str], Dict[str, Any]] = {}
    start = time.perf_counter()

    def one(item):
        return item, run_row(item[0], item[1], sparsities, args.timeout, not args.no_onnx)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:  # each row is a child process
        for (family, transform), row in pool.map(one, work):
            done[(family, transform)] = row
            print(f"[{len(done)}/{len(work)}] {family} {transform}: {row['status']}"
                  f"{' (' + row['reason'] + ')' if row.get('reason') else ''} {row.get('seconds', 0):.1f}s", flush=True)
            # written after every row: an interrupted run keeps its rows (and an update the rows it did not rerun)
            rows = [done.get(key) or kept[key] for key in planned if key in done or key in kept]
            write_text(args.markdown, to_markdown(rows, shown, header, len(planned), updates))
            write_text(args.json, json.dumps({"command": header, "updates": updates, "sparsities": shown,
                                              "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.markdown} and {args.json} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
