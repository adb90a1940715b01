"""sift-compile: capture a model, rewrite it at iso-FLOP, print the FLOP report, write files.

    sift-compile torchvision:resnet18 --transform parallel --sparsity 0.75 --onnx r18.onnx
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..config import ACTIVATIONS
from ..pipelines import TRANSFORM_PIPELINES
from ._common import all_or_nothing, run_main, sparsity_arg


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sift-compile",
        description="Rewrite a PyTorch model with a Sparse Iso-FLOP Transformation (Sparse-IFT) and report its FLOPs.",
        epilog="MODEL: torchvision:NAME | timm:NAME | transformers:MODEL_TYPE | package.module:callable | FILE.pt "
               "(options after commas: torchvision:resnet18,num_classes=10). Nothing is downloaded.")
    p.add_argument("model", metavar="MODEL", help="the model to compile (see below)")
    p.add_argument("--transform", "-t", choices=list(TRANSFORM_PIPELINES), default="parallel",
                   help="Sparse-IFT member, or 'none' for the dense baseline (default: parallel)")
    p.add_argument("--sparsity", "-s", type=sparsity_arg, default=None,
                   help="sparsity s in (0, 1): the fraction of zero weights in sparse layers (required unless "
                        "--transform none)")
    p.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224 (default per source; "
                                         "transformers: 1,128 token ids)")
    p.add_argument("--input-dtype", help="float32 (vision default) or int64 (token ids)")
    p.add_argument("-o", "--output", help="write the compiled model here (load with sift_compiler.load)")
    p.add_argument("--onnx", help="write masked ONNX here (exact zeros, opset --opset)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 13 to 17 (default 17)")
    p.add_argument("--no-deepsparse-check", action="store_true",
                   help="do not compile the ONNX file in DeepSparse nor compare it with onnxruntime")
    p.add_argument("--report", help="write the FLOP report as JSON here")
    p.add_argument("--keep-dense", nargs="+", default=[], metavar="PATTERN",
                   help="keep layers dense whose name or type matches these glob patterns (e.g. 'layer4.*' Linear)")
    p.add_argument("--weights", help="a state dict file to load into MODEL (read without running code)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow MODEL to be a torch.save(model) pickle; loading it runs code from the file")
    p.add_argument("--seed", type=int, default=0, help="seed of the random masks (default 0)")
    p.add_argument("--activation", choices=ACTIVATIONS, default="auto",
                   help="sigma after sparse Linear layers (default: the model's own)")
    p.add_argument("--linear-norm", action="store_true",
                   help="add a LayerNorm to sigma after sparse Linear layers (Parallel, Factorized)")
    p.add_argument("--round-to", type=int, default=1, help="Sparse Wide: round widened channels to this multiple")
    p.add_argument("--attention-width", choices=("keep", "scale"), default="keep",
                   help="Sparse Wide on attention: keep heads x head_dim (paper), or scale it with d_model")
    p.add_argument("--strict", action="store_true",
                   help="fail (exit 2) when the transform cannot be applied as asked, instead of warning")
    p.add_argument("--max-layers", type=int, default=None, help="print at most this many layer rows")
    p.add_argument("--quiet", "-q", action="store_true", help="print no report")
    p.add_argument("--verbose", "-v", action="store_true", help="log details and show tracebacks")
    return p


def _validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> float:
    if args.transform == "none":
        return 0.0
    if args.sparsity is None:
        parser.error(f"--sparsity is required with --transform {args.transform}")
    return args.sparsity


def _body(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ..api import compile as sift_compile
    from ..capture.sources import load_model, parse_dtype, parse_input_shape
    from ..io import check_writable, write_text
    sparsity = _validate(args, parser)
    for path, what in ((args.output, "model file"), (args.onnx, "ONNX file"), (args.report, "report")):
        if path:
            check_writable(path, what)
    shape = parse_input_shape(args.input_shape) if args.input_shape else None
    dtype = parse_dtype(args.input_dtype) if args.input_dtype else None
    print(f"sift-compile: loading {args.model}", file=sys.stderr, flush=True)
    import torch
    torch.manual_seed(args.seed)  # random-weight models are reproducible (sift-check --against SPEC)
    source = load_model(args.model, shape, dtype, trust_pickle=args.trust_pickle, weights=args.weights)
    print(f"sift-compile: compiling ({args.transform}, input {source.describe_input()})", file=sys.stderr, flush=True)
    result = sift_compile(source.module, args.transform, sparsity, source.args, source.kwargs, seed=args.seed,
                          keep_dense=args.keep_dense, activation=args.activation, linear_norm=args.linear_norm,
                          round_to=args.round_to,
                          attention_width=args.attention_width, strict=args.strict,
                          progress=sys.stderr if args.verbose else None,
                          model_name=args.model,
                          source={"spec": args.model, "family": source.family, "weights": args.weights})
    if not args.quiet:
        print(result.report.table(max_layers=args.max_layers))
    with all_or_nothing() as written:
        if args.report:
            write_text(args.report, result.report.to_json())
            written.append(args.report)
        if args.onnx:
            _write_onnx(result, source, args, written)
        if args.output:
            result.save(args.output)
            written.append(args.output)
    for path in written:
        print(f"sift-compile: wrote {path}", file=sys.stderr)
    return 0


def _write_onnx(result, source, args, written) -> None:
    from ..exporters.onnx import export_onnx
    info = export_onnx(result.module, source.args, args.onnx, source.kwargs, opset=args.opset,
                       deepsparse="skip" if args.no_deepsparse_check else "auto")
    written.append(args.onnx)
    for note in info.notes:
        print(f"sift-compile: note: {note}", file=sys.stderr)
    if getattr(info, "verification", None) is not None and not args.quiet:
        print(info.verification.table())


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    return run_main("sift-compile", lambda a: _body(a, parser), parser, argv)


if __name__ == "__main__":
    sys.exit(main())
