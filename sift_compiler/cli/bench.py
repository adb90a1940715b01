"""sift-bench: latency and throughput of models on DeepSparse, onnxruntime, OpenVINO and torch, side by side.

Exit 0 when every model ran on every engine; 1 when some could not (a DeepSparse abort, a file the
exporter marked not for DeepSparse: its row says FAILED and why, the others are timed); 2 on bad input.

    sift-bench r18-dense.onnx r18-parallel-0.90.onnx --batch-size 64 --plot fig3.png
    sift-bench torchvision:resnet18 --transform parallel --sparsity 0.5,0.75,0.9 --batch-size 16

MODEL is an ONNX file, or a model spec as for sift-compile: then the dense baseline and every
--transform x --sparsity variant are compiled, exported (verified) and benchmarked. --runtime
takes any of deepsparse, onnxruntime, openvino, openvino-sparse, torch, torch-compile, torch-csr;
one that is not installed is left out with one line saying how to install it. The torch runtimes
run the compiled model (MODEL.sift.pt beside MODEL.onnx, as sift-compile -o writes it; spec
models have theirs); a file without one gets a skipped row.

    sift-bench r18.onnx --runtime onnxruntime,openvino,torch,torch-csr     # r18.sift.pt beside it
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from typing import List, Optional, Sequence

from ..api import load
from ..capture.sources import parse_dtype, parse_input_shape
from ..errors import UserInputError
from ..exporters.bench import describe_file, results_json, results_table, run_benchmarks
from ..exporters.forms import DEFAULT_FORM, FORMS
from ..exporters.inputs import input_specs, parse_shapes
from ..exporters.plot import plot_latency
from ..exporters.runtimes import ENGINES, TORCH_ENGINES, engine_status
from ..exporters.weights import load_onnx
from ..io import check_writable, write_text
from ..pipelines import transform_names
from ..variants import export_variants
from ._common import run_main, sparsity_list_arg


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sift-bench",
        description="Benchmark models on DeepSparse, onnxruntime, OpenVINO and torch side by side: latency (median, p90) "
                    "and throughput, as a table, JSON and a latency-against-sparsity plot (paper Figure 3).",
        epilog="MODEL: FILE.onnx, or torchvision:NAME | timm:NAME | transformers:TYPE | package.module:callable "
               "(compiled with each --transform at each --sparsity, plus the dense baseline).")
    p.add_argument("models", nargs="+", metavar="MODEL", help="ONNX files and/or model specs")
    p.add_argument("--transform", "-t", default="parallel",
                   help=f"comma list of transforms for model specs: {', '.join(transform_names())} "
                        "(default parallel)")
    p.add_argument("--sparsity", "-s", type=sparsity_list_arg, default=None,
                   help="comma list of sparsities for model specs, e.g. 0.5,0.75,0.9 (required with a spec)")
    p.add_argument("--batch-size", "-b", type=int, default=64, help="samples per batch (default 64, as the paper)")
    p.add_argument("--runtime", "--engines", dest="engines", default="deepsparse,onnxruntime",
                   help=f"comma list of runtimes: {', '.join(ENGINES)} (default deepsparse,onnxruntime)")
    p.add_argument("--iterations", "-n", type=int, default=10, help="timed batches per model and engine (default 10)")
    p.add_argument("--warmup", "-w", type=int, default=2, help="untimed batches first (default 2)")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the whole sweep this many times and pool the timings (steadier on a shared machine)")
    p.add_argument("--num-cores", type=int, default=None, help="cores each engine may use (default: all)")
    p.add_argument("--input-shape", help="spec models: example input shape (e.g. 1,3,224,224); ONNX files: "
                                         "shape of the first input when it has symbolic dims besides the batch")
    p.add_argument("--input-dtype", help="spec models: float32 or int64 (token ids)")
    p.add_argument("--form", choices=FORMS, default=DEFAULT_FORM,
                   help=f"export form of Sparse Parallel layers (default {DEFAULT_FORM})")
    p.add_argument("--out-dir", help="keep the exported ONNX files here (default: a temporary directory)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and masks for model specs (default 0)")
    p.add_argument("--json", help="write all results as JSON here")
    p.add_argument("--plot", help="write the latency-against-sparsity plot here (.png, .pdf, .svg)")
    p.add_argument("--trust-source", action="store_true",
                   help="torch runtimes: a MODEL.sift.pt whose model is user code (package.module:callable) may "
                        "import and run that code to rebuild it (spec models compiled in this run always may)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", "-v", action="store_true", help="log details and show tracebacks")
    return p


def _engines(text: str) -> List[str]:
    """The runtimes asked for that can run here; one line for each left out (an error when none is left)."""
    engines = list(dict.fromkeys(e.strip() for e in text.split(",") if e.strip()))
    unknown = [e for e in engines if e not in ENGINES]
    if unknown or not engines:
        raise UserInputError(f"--runtime {text!r}: choose from {', '.join(ENGINES)}")
    missing = {}
    for name in engines:
        usable, reason = engine_status(name)
        if not usable:
            missing[name] = reason
    if len(missing) == len(engines):
        raise UserInputError("; ".join(missing.values()))
    for name, reason in missing.items():
        print(f"sift-bench: {name} left out: {reason}", file=sys.stderr)
    if missing:
        left = [e for e in engines if e not in missing]
        print(f"sift-bench: running {', '.join(left)}{' alone' if len(left) == 1 else ''}", file=sys.stderr)
    return [e for e in engines if e not in missing]


def _validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    for name in ("batch_size", "iterations", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or (args.num_cores is not None and args.num_cores < 1):
        parser.error("--warmup must be >= 0 and --num-cores >= 1")
    transforms = [t.strip() for t in args.transform.split(",") if t.strip()]
    bad = [t for t in transforms if t not in transform_names()]
    if bad:
        raise UserInputError(f"unknown transform {bad[0]!r}: choose from {', '.join(transform_names())}")
    args.transforms = transforms
    specs = [m for m in args.models if not m.lower().endswith(".onnx")]
    if specs and not args.sparsity and any(t != "none" for t in transforms):
        parser.error(f"--sparsity is required to compile {specs[0]} (e.g. --sparsity 0.5,0.75,0.9)")
    for path in (args.json, args.plot):
        if path:
            check_writable(path)


def _collect_models(args, out_dir: str):
    models = []
    for item in args.models:
        if item.lower().endswith(".onnx"):
            models.append(describe_file(item))
            continue
        shape = parse_input_shape(args.input_shape) if args.input_shape else None
        dtype = parse_dtype(args.input_dtype) if args.input_dtype else None
        variants = export_variants(item, args.transforms, args.sparsity or [], out_dir, input_shape=shape,
                                   input_dtype=dtype, form=args.form, seed=args.seed, log=sys.stderr,
                                   save_compiled=bool(set(args.engine_list) & set(TORCH_ENGINES)))
        for v in variants:
            v.model.compiled_here = True
        models += [v.model for v in variants]
    return models


def _body(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    _validate(args, parser)
    engines = args.engine_list = _engines(args.engines)
    with contextlib.ExitStack() as stack:
        out_dir = args.out_dir
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
        else:
            out_dir = tempfile.mkdtemp(prefix="sift-bench-")
            stack.callback(shutil.rmtree, out_dir, True)
        models = _collect_models(args, out_dir)
        files = [m for m in args.models if m.lower().endswith(".onnx")]
        shapes = parse_shapes(args.input_shape, input_specs(load_onnx(files[0]))) if files and args.input_shape else None
        print(f"sift-bench: {len(models)} models x {len(engines)} engines, batch {args.batch_size}, "
              f"{args.rounds} x ({args.warmup} warm-up + {args.iterations} timed batches) each", file=sys.stderr,
              flush=True)
        results = run_benchmarks(models, engines, args.batch_size, args.iterations, args.warmup, args.num_cores,
                                 progress=not args.no_progress, input_shapes=shapes, seed=args.seed,
                                 rounds=args.rounds, load_torch=lambda path: _load_torch(path, args, models))
    print(results_table(results))
    for line in _notes(results):
        print(f"note: {line}")
    settings = {"batch_size": args.batch_size, "iterations": args.iterations, "warmup": args.warmup,
                "rounds": args.rounds,
                "num_cores": args.num_cores, "engines": engines, "form": args.form}
    if args.json:
        write_text(args.json, json.dumps(results_json(results, settings), indent=2) + "\n")
        print(f"sift-bench: wrote {args.json}", file=sys.stderr)
    if args.plot:
        plot_latency(results, args.plot, f"batch {args.batch_size}, {args.num_cores or os.cpu_count()} cores")
        print(f"sift-bench: wrote {args.plot}", file=sys.stderr)
    failed = [r for r in results if r.failed]
    if failed:
        print(f"sift-bench: {len(failed)} of {len(results)} runs failed (marked FAILED above)", file=sys.stderr)
    return 1 if failed else 0


def _load_torch(path: str, args: argparse.Namespace, models):
    """The compiled module of a ``.sift.pt`` (`sift_compiler.load`); code a file names is imported only with
    --trust-source, or for the spec models this run compiled (``compiled_here``)."""
    ours = any(m.torch_path == path and m.compiled_here for m in models)
    return load(path, trust_source=args.trust_source or ours).module


def _notes(results) -> List[str]:
    notes = []
    for r in results:
        if r.fraction_of_supported_ops is not None and r.fraction_of_supported_ops < 1.0:
            notes.append(f"{r.label}: DeepSparse runs only {r.fraction_of_supported_ops:.0%} of the ops itself; "
                         "the rest falls back to its bundled onnxruntime")
    if any(r.engine == "deepsparse" and r.sparsity is not None and 0 < r.sparsity < 0.9 for r in results):
        notes.append("FP32 unstructured sparsity below about 90% is often slower than dense on DeepSparse")
    return notes


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    return run_main("sift-bench", lambda a: _body(a, parser), parser, argv)


if __name__ == "__main__":
    sys.exit(main())
