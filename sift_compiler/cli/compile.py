"""sift-compile: capture a model, rewrite it at iso-FLOP, print the FLOP report, write files.

    sift-compile torchvision:resnet18 --transform parallel --sparsity 0.75 --onnx r18.onnx
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Optional, Sequence

import torch

from ..api import compile as sift_compile
from ..api import compile_for_latency
from ..capture.sources import load_model, parse_dtype, parse_input_shape
from ..config import ACTIVATIONS, OUTPUTS, CompileConfig
from ..errors import UserInputError
from ..exporters.checkpoints import FORMATS as CHECKPOINT_FORMATS
from ..exporters.remedies import export_with_compile_remedies
from ..io import check_writable, write_text
from ..latency import LatencyBudget, check_runtime
from ..pipelines import transform_names, transforms_help
from ._common import all_or_nothing, deepsparse_absent_line, run_main, sparsity_arg


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sift-compile",
        description="Rewrite a PyTorch model with a Sparse Iso-FLOP Transformation (Sparse-IFT) and report its FLOPs.",
        epilog="MODEL: torchvision:NAME | timm:NAME | transformers:MODEL_TYPE | package.module:callable | FILE.pt "
               "(options after commas: torchvision:resnet18,num_classes=10). Nothing is downloaded.")
    p.add_argument("model", metavar="MODEL", help="the model to compile (see below)")
    p.add_argument("--transform", "-t", choices=transform_names(), default="parallel",
                   help=f"Sparse-IFT member, or 'none' for the dense baseline (default: parallel): {transforms_help()}")
    p.add_argument("--sparsity", "-s", type=sparsity_arg, default=None,
                   help="sparsity s in (0, 1): the fraction of zero weights in sparse layers (required unless "
                        "--transform none)")
    p.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224 (default per source; "
                                         "transformers: 1,128 token ids)")
    p.add_argument("--input-dtype", help="float32 (vision default) or int64 (token ids)")
    p.add_argument("-o", "--output", help="write the compiled model here (load with sift_compiler.load)")
    p.add_argument("--output-form", choices=OUTPUTS, default="auto",
                   help="the compiled model: your model's own class with the new modules in it ('native'), the "
                        "torch.fx graph ('graph'), or native where it computes exactly what the graph does "
                        "(default 'auto'; the report says why when it is the graph)")
    p.add_argument("--onnx", help="write masked ONNX here (exact zeros, opset --opset)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 13 to 17 (default 17)")
    p.add_argument("--deepsparse", choices=("auto", "require", "skip"), default="auto",
                   help="DeepSparse checks of the ONNX file: auto (default: run them where DeepSparse is installed; "
                        "a file only DeepSparse fails is written, marked not for DeepSparse, exit 1), require (such "
                        "a file, or no DeepSparse, is a failure and nothing is written), skip")
    p.add_argument("--no-deepsparse-check", action="store_true", help="the same as --deepsparse skip")
    p.add_argument("--report", help="write the FLOP report as JSON here")
    p.add_argument("--keep-dense", nargs="+", default=[], metavar="PATTERN",
                   help="keep layers dense whose name or type matches these glob patterns (e.g. 'layer4.*' Linear)")
    p.add_argument("--weights", help="a state dict file to load into MODEL (read without running code)")
    p.add_argument("--meta", action="store_true",
                   help="build MODEL on the meta device: compile and report without allocating any weight (a 7B "
                        "model in seconds; e.g. transformers:llama2-7b); no -o/--onnx, materialize in Python")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow MODEL to be a torch.save(model) pickle; loading it runs code from the file")
    p.add_argument("--seed", type=int, default=0, help="seed of the random masks (default 0)")
    p.add_argument("--activation", choices=ACTIVATIONS, default="auto",
                   help="sigma after sparse Linear layers (default: the model's own)")
    p.add_argument("--linear-norm", action="store_true",
                   help="add a LayerNorm to sigma after sparse Linear layers (Parallel, Factorized)")
    p.add_argument("--round-to", type=int, default=1, help="Sparse Wide: round widened channels to this multiple")
    p.add_argument("--pattern", default="unstructured",
                   help="mask pattern: unstructured (default) or N:M, e.g. 2:4 at --sparsity 0.5 for GPU 2:4 kernels "
                        "(transposable N:M masks; Sparse Wide rounds its widths to multiples of M)")
    p.add_argument("--attention-width", choices=("keep", "scale"), default="keep",
                   help="Sparse Wide on attention: keep heads x head_dim (paper), or scale it with d_model")
    p.add_argument("--kernel-head-dims", action="store_true",
                   help="Sparse Wide: widened head dims that attention kernels accept (multiples of 8 up to 256, "
                        "preferring 64/80/96/128/...); the report's notes say what was chosen")
    p.add_argument("--save-pretrained", metavar="DIR",
                   help="write a checkpoint folder here (see --checkpoint-format; load with sift_compiler.load, "
                        "a standard one with transformers alone)")
    p.add_argument("--checkpoint-format", choices=CHECKPOINT_FORMATS, default="auto",
                   help="--save-pretrained: standard (a plain checkpoint of a wider model of the same class: Sparse "
                        "Wide Hugging Face models), compact (values + bitmask), sift (the model's own "
                        "save_pretrained), auto (default: standard where it can be, else sift with a warning)")
    p.add_argument("--capacity", type=float, default=None,
                   help="the transform's size instead of the iso-FLOP formula: wide k, parallel branches B, "
                        "factorized h and doped r as multiples of their iso-FLOP values")
    p.add_argument("--budget", choices=("flops", "latency"), default="flops",
                   help="flops (default): iso-FLOP, as the paper; latency: sparse layers stay at s and the largest "
                        "capacity whose latency on --runtime meets the dense model's is searched (measured here)")
    p.add_argument("--runtime", choices=("deepsparse", "onnxruntime"), default="deepsparse",
                   help="--budget latency: the runtime to measure on (default deepsparse)")
    p.add_argument("--batch-size", type=int, default=1, help="--budget latency: batch size measured (default 1)")
    p.add_argument("--latency-ratio", type=float, default=1.0,
                   help="--budget latency: latency allowed, as a multiple of the dense model's (default 1.0)")
    p.add_argument("--rounds", type=int, default=5,
                   help="--budget latency: interleaved rounds (dense, candidate) per measurement (default 5)")
    p.add_argument("--flop-tolerance", type=float, default=None,
                   help="allow |sift/dense - 1| FLOPs up to this (default: only what per-layer rounding explains; "
                        "a larger miss is an error)")
    p.add_argument("--strict", action="store_true",
                   help="fail (exit 2) when the transform cannot be applied as asked, instead of warning")
    p.add_argument("--max-layers", type=int, default=None, help="print at most this many layer rows")
    p.add_argument("--quiet", "-q", action="store_true", help="print no report")
    p.add_argument("--verbose", "-v", action="store_true", help="log details and show tracebacks")
    return p


def _validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> float:
    if args.budget == "latency" and args.transform == "none":
        parser.error("--budget latency sizes a Sparse-IFT transform: pass --transform wide|parallel|factorized|doped")
    if args.batch_size < 1 or args.rounds < 1 or args.latency_ratio <= 0:
        parser.error("--batch-size and --rounds must be at least 1, --latency-ratio positive")
    if args.transform == "none":
        return 0.0
    if args.sparsity is None:
        parser.error(f"--sparsity is required with --transform {args.transform}")
    return args.sparsity


def _body(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    sparsity = _validate(args, parser)
    if args.budget == "latency" and args.capacity is None:
        check_runtime(args.runtime)  # exit 2, before anything slow, on a machine without it
    for path, what in ((args.output, "model file"), (args.onnx, "ONNX file"), (args.report, "report")):
        if path:
            check_writable(path, what)
    shape = parse_input_shape(args.input_shape) if args.input_shape else None
    dtype = parse_dtype(args.input_dtype) if args.input_dtype else None
    print(f"sift-compile: loading {args.model}", file=sys.stderr, flush=True)
    torch.manual_seed(args.seed)  # random-weight models are reproducible (sift-check --against SPEC)
    if args.save_pretrained and os.path.isfile(args.save_pretrained):
        raise UserInputError(f"--save-pretrained {args.save_pretrained!r} is a file: give a folder")
    if args.meta and (args.output or args.onnx or args.save_pretrained):
        raise UserInputError("--meta compiles without weights: there is nothing to write with -o or --onnx; "
                             "use sift.materialize(result.module, device, seed) in Python, then save or export")
    source = load_model(args.model, shape, dtype, trust_pickle=args.trust_pickle, weights=args.weights,
                        meta=args.meta)
    print(f"sift-compile: compiling ({args.transform}, input {source.describe_input()})", file=sys.stderr, flush=True)
    config = CompileConfig(transform=args.transform, sparsity=sparsity, seed=args.seed,
                           keep_dense=tuple(args.keep_dense), activation=args.activation, linear_norm=args.linear_norm,
                           round_to=args.round_to, attention_width=args.attention_width, strict=args.strict,
                           kernel_head_dims=args.kernel_head_dims,
                           budget=args.budget, capacity=args.capacity, flop_tolerance=args.flop_tolerance,
                           pattern=args.pattern)
    options = dict(progress=sys.stderr if args.verbose else None, model_name=args.model,
                   source={"spec": args.model, "family": source.family, "weights": args.weights},
                   output=args.output_form)

    def compile_with(**changes):
        """Recompile with some options changed (the export remedies): config fields or compile keywords."""
        fields = {k: v for k, v in changes.items() if k in CompileConfig.__dataclass_fields__}
        others = {k: v for k, v in changes.items() if k not in fields}
        changed = dataclasses.replace(config, **fields)
        return sift_compile(source.module, changed, source.args, source.kwargs, **{**options, **others})
    if args.budget == "latency" and args.capacity is None:
        result = _search_latency(args, source, config, options)
        config = dataclasses.replace(config, capacity=result.latency.capacity)  # remedies recompile the chosen size
    else:
        result = compile_with()
    if not args.quiet:
        print(result.report.table(max_layers=args.max_layers))
    outcome = "ok"
    with all_or_nothing() as written:
        if args.onnx:
            result, outcome = _write_onnx(result, source, args, written, compile_with)
        if args.report:
            write_text(args.report, result.report.to_json())
            written.append(args.report)
        if args.output:
            result.save(args.output)
            written.append(args.output)
        if args.save_pretrained:  # last: a folder, written whole or not at all by itself
            kind = result.save_pretrained(args.save_pretrained, format=args.checkpoint_format)
            print(f"sift-compile: wrote {args.save_pretrained} ({kind} checkpoint)", file=sys.stderr)
    for path in written:
        print(f"sift-compile: wrote {path}", file=sys.stderr)
    return 1 if outcome == "not-for-deepsparse" else 0


def _write_onnx(result, source, args, written, compile_with):
    """Export (the outcome policy: exporters/outcome.py; onnxruntime is checked against torch there);
    returns the model written and the outcome."""
    mode = "skip" if args.no_deepsparse_check else args.deepsparse
    result, info, recompiled = export_with_compile_remedies(result, compile_with, source.args, args.onnx,
                                                            source.kwargs, opset=args.opset, deepsparse=mode)
    written.append(args.onnx)
    if recompiled and not args.quiet:
        print(f"\nremedied: {recompiled}; the model written is this one:")
        print(result.report.table(max_layers=args.max_layers))
    for note in info.notes:
        print(f"sift-compile: note: {note}", file=sys.stderr)
    if getattr(info, "verification", None) is not None and not args.quiet:
        print(info.verification.table())
    if getattr(info, "verification", None) is not None:
        line = deepsparse_absent_line(info.verification)
        if line:
            print(f"sift-compile: {line}", file=sys.stderr)
    if info.outcome == "not-for-deepsparse":
        print(f"sift-compile: {args.onnx}: written for onnxruntime; DeepSparse must not run it: "
              f"{info.deepsparse_reason}", file=sys.stderr)
    return result, info.outcome


def _search_latency(args, source, config, options):
    """--budget latency: measure, print the search, return the chosen model."""
    print(f"sift-compile: searching the capacity whose latency on {args.runtime} (batch {args.batch_size}) is at "
          f"most {args.latency_ratio:g}x the dense model's", file=sys.stderr, flush=True)
    budget = LatencyBudget(batch_size=args.batch_size, ratio=args.latency_ratio, rounds=args.rounds)
    search_options = {k: v for k, v in options.items() if k != "progress"}
    result = compile_for_latency(source.module, config, source.args, source.kwargs, args.runtime,
                                 budget, search_options, log=sys.stderr)
    if not args.quiet:
        print(result.latency.table() + "\n")
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    return run_main("sift-compile", lambda a: _body(a, parser), parser, argv)


if __name__ == "__main__":
    sys.exit(main())
