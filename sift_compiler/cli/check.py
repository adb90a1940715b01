"""sift-check: verify ONNX files for CI. Exit 0: every check holds; 1: some failed (listed); 2: bad input.

    sift-check model.onnx
    sift-check model.onnx --against model.sift.pt --min-sparsity 0.7 --json check.json
    sift-check model.onnx --against torchvision:resnet18 --weights dense.pt --transform parallel --sparsity 0.75

Checks (sift_compiler.exporters.checks): the onnx checker; each sift sparse layer keeps its
zeros and its target sparsity (from the file's metadata, or from --against); --min-sparsity;
onnxruntime against torch (with --against); DeepSparse compiles the file (fraction of supported
ops, --min-supported-ops) and its outputs agree with onnxruntime's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional, Sequence

import numpy as np
import torch

from ..api import compile as sift_compile
from ..api import load
from ..capture.sources import load_model
from ..compare import tensor_leaves
from ..config import CompileConfig
from ..errors import UserInputError
from ..exporters.checks import DEFAULT_RTOL, verify_onnx
from ..exporters.forms import DEFAULT_FORM, FORMS, apply_form
from ..exporters.inputs import input_specs, parse_shapes, random_feeds
from ..exporters.weights import META_EXPORT, get_metadata, layer_patterns, load_onnx, match_layers
from ..io import check_writable, write_text
from ..module_tools import eval_mode
from ..pipelines import transform_names, transforms_help
from ..serialize import read
from ._common import deepsparse_absent_line, run_main, sparsity_arg


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sift-check",
        description="Verify exported ONNX files: validity, per-layer sparsity, onnxruntime against torch, and "
                    "DeepSparse against onnxruntime. Exit 0 when every check holds, 1 when one fails, 2 on bad input.",
        epilog="--against: a compiled model file (sift-compile -o FILE) or a MODEL spec with --transform/--sparsity "
               "(weights from --weights, or drawn after torch.manual_seed(--seed) as sift-bench does).")
    p.add_argument("files", nargs="+", metavar="MODEL.onnx", help="ONNX files to check")
    p.add_argument("--against", metavar="MODEL", help="the torch model the files were exported from")
    p.add_argument("--transform", "-t", choices=transform_names(),
                   help=f"with a MODEL spec: its transform ({transforms_help()})")
    p.add_argument("--sparsity", "-s", type=sparsity_arg, help="with a MODEL spec: its sparsity")
    p.add_argument("--weights", help="with a MODEL spec: a state dict of the dense model")
    p.add_argument("--seed", type=int, default=0, help="with a MODEL spec: seed of weights and masks (default 0)")
    p.add_argument("--trust-source", action="store_true",
                   help="a compiled model file whose dense model is package.module:callable: allow importing it")
    p.add_argument("--min-sparsity", type=float, default=None, metavar="X",
                   help="every sparse layer at least this sparse (files without sift metadata: every weight but the "
                        "first and last)")
    p.add_argument("--rtol", type=float, default=DEFAULT_RTOL,
                   help=f"output agreement: max|a-b| / max|b| at most this (default {DEFAULT_RTOL:g})")
    p.add_argument("--min-supported-ops", type=float, default=None, metavar="F",
                   help="fail when DeepSparse runs less than this fraction of the ops itself (e.g. 1.0)")
    p.add_argument("--require-deepsparse", action="store_true",
                   help="fail when DeepSparse is not installed (default: its checks are skipped)")
    p.add_argument("--no-deepsparse", action="store_true", help="skip the DeepSparse checks")
    p.add_argument("--batch-size", "-b", type=int, default=None,
                   help="batch of the random inputs (default: the exporter's example batch, else 1)")
    p.add_argument("--input-shape", help="shape of the first input, or NAME=SHAPE;NAME=SHAPE for several")
    p.add_argument("--json", help="write every check and measurement as JSON here")
    p.add_argument("--verbose", "-v", action="store_true", help="log details and show tracebacks")
    return p


def _validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if (args.transform or args.sparsity is not None or args.weights) and not args.against:
        parser.error("--transform, --sparsity and --weights describe the --against model: pass --against MODEL")
    if args.min_sparsity is not None and not 0 <= args.min_sparsity < 1:
        parser.error(f"--min-sparsity must lie in [0, 1), got {args.min_sparsity}")
    if args.rtol <= 0:
        parser.error(f"--rtol must be positive, got {args.rtol}")
    if args.min_supported_ops is not None and not 0 <= args.min_supported_ops <= 1:
        parser.error(f"--min-supported-ops must lie in [0, 1], got {args.min_supported_ops}")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.require_deepsparse and args.no_deepsparse:
        parser.error("--require-deepsparse and --no-deepsparse contradict each other")
    if args.json:
        check_writable(args.json, "JSON report")


def _load_against(args: argparse.Namespace):
    """The reference `CompileResult`: a compiled model file, or a spec compiled here."""
    if os.path.isfile(args.against):  # a compiled model file (sift-compile -o): it knows its own transform
        if args.transform or args.sparsity is not None or args.weights:
            raise UserInputError(f"--against {args.against} is a file: a compiled model already says its weights, "
                                 "transform and sparsity; drop --transform/--sparsity/--weights")
        read(args.against)  # a clear error for anything that is not a sift-compiler/1 file
        return load(args.against, trust_source=args.trust_source)
    transform = args.transform or "none"
    if transform != "none" and args.sparsity is None:
        raise UserInputError(f"--against {args.against} with --transform {transform} needs --sparsity")
    torch.manual_seed(args.seed)
    source = load_model(args.against, weights=args.weights)
    config = CompileConfig(transform=transform, sparsity=args.sparsity or 0.0, seed=args.seed)
    return sift_compile(source.module, config, source.args, source.kwargs, model_name=args.against)


def _torch_reference(result, feeds):
    """Run the reference module on the feeds: inputs by name when the module takes keywords."""
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}
    kwargs = {k: v for k, v in tensors.items() if k in result.unit.kwargs}
    args = [v for k, v in tensors.items() if k not in kwargs]
    with torch.no_grad(), eval_mode(result.module):
        out = result.module(*args, **kwargs)
    return [t.detach().numpy() for t in tensor_leaves(out)]


def _layers_against(result, model):
    """Match the reference's sparse layers in the file, in the form the file says it used."""
    recorded = (get_metadata(model, META_EXPORT) or {}).get("form")
    candidates = [recorded] if recorded in FORMS else [DEFAULT_FORM, "branches"]
    best = None
    for form in candidates:
        patterns = layer_patterns(apply_form(result.graph_module, form).module)
        layers, missing = match_layers(patterns, model)
        if best is None or len(missing) < len(best[1]):
            best = (layers, missing)
    return best


def _check_file(path: str, args: argparse.Namespace, reference_model):
    model = load_onnx(path)
    specs = input_specs(model)
    feeds = random_feeds(specs, args.batch_size, parse_shapes(args.input_shape, specs), seed=args.seed)
    reference, layers, missing = None, None, ()
    if reference_model is not None:
        reference = _torch_reference(reference_model, feeds)
        layers, missing = _layers_against(reference_model, model)
    del model
    mode = "skip" if args.no_deepsparse else ("require" if args.require_deepsparse else "auto")
    return verify_onnx(path, feeds, reference=reference, layers=layers, missing=missing,
                       min_sparsity=args.min_sparsity, rtol=args.rtol, deepsparse=mode,
                       min_supported_ops=args.min_supported_ops)


def _body(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    _validate(args, parser)
    for path in args.files:  # every input is readable before anything slow runs
        load_onnx(path, load_external_data=False)
    reference = _load_against(args) if args.against else None
    reports = []
    for path in args.files:
        report = _check_file(path, args, reference)
        reports.append(report)
        print(report.table())
    line = next((deepsparse_absent_line(r) for r in reports if deepsparse_absent_line(r)), "")
    if line:  # once, not per file: it is about this machine
        print(f"sift-check: {line}", file=sys.stderr)
    failures: List[str] = [f"{r.path}: {f}" for r in reports for f in r.failures()]
    if args.json:
        write_text(args.json, json.dumps({"ok": not failures, "files": [r.to_dict() for r in reports]}, indent=2)
                   + "\n")
    if failures:
        print(f"sift-check: {len(failures)} check(s) failed:", file=sys.stderr)
        for line in failures:
            print(f"  - {line}", file=sys.stderr)
        return 1
    print(f"sift-check: all checks hold ({len(reports)} file{'s' if len(reports) > 1 else ''})")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    return run_main("sift-check", lambda a: _body(a, parser), parser, argv)


if __name__ == "__main__":
    sys.exit(main())
