"""Paper Section 4 on this machine: Sparse-IFT ResNet-18 on DeepSparse and on onnxruntime.

Dense ResNet-18 and its Sparse Wide and Sparse Parallel variants at s = 0.5, 0.75, 0.9 (compiled
by sift-compiler, exact-count random masks, iso-FLOP compensation), exported to ONNX (verified:
DeepSparse outputs against onnxruntime on every file), then timed on both engines in the same
run. For each model it reports DeepSparse's speedup over onnxruntime (paper: 5.2x for Sparse Wide
at 90%, batch 64, 224 x 224) and its DeepSparse latency relative to the dense model (ideal 1.0).
``--forms stacked-conv`` adds Sparse Parallel in other export forms (the default ``auto`` keeps
the ReLU branches; ``stacked-conv`` stacks them into one conv), to show what the form is worth.

    python benchmarks/deepsparse_resnet18.py --batch-size 64 --forms stacked-conv --json r18.json --markdown r18.md --plot r18.png
    python benchmarks/deepsparse_resnet18.py --batch-size 16 --iterations 3 --sparsity 0.9   # quick

Transforms not available in this build (Sparse Wide before it lands) are skipped with a note.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import List, Optional, Sequence

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")

import torch  # noqa: E402
import torchvision  # noqa: E402

from sift_compiler import compile as sift_compile  # noqa: E402
from sift_compiler.exporters.bench import (BenchModel, machine_description, results_json, results_table,  # noqa: E402
                                           run_benchmarks)
from sift_compiler.exporters.forms import DEFAULT_FORM, FORMS  # noqa: E402
from sift_compiler.exporters.onnx import export_onnx  # noqa: E402
from sift_compiler.exporters.runtimes import deepsparse_status  # noqa: E402
from sift_compiler.io import write_text  # noqa: E402
from sift_compiler.registry import transform_names  # noqa: E402


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=64, help="paper: 64 (use 16 when time is short)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--compile-size", type=int, default=64,
                   help="input size sift compiles at (ResNet-18's graph does not depend on it; smaller is faster)")
    p.add_argument("--sparsity", default="0.5,0.75,0.9")
    p.add_argument("--transforms", default="wide,parallel")
    p.add_argument("--forms", default="",
                   help=f"extra export forms for Sparse Parallel besides {DEFAULT_FORM} (e.g. stacked-conv)")
    p.add_argument("--engines", default="deepsparse,onnxruntime")
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1, help="repeat the sweep and pool timings (shared machines)")
    p.add_argument("--num-cores", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", help="keep the ONNX files here (default: a temporary directory)")
    p.add_argument("--json", help="write all measurements here")
    p.add_argument("--markdown", help="write the summary table (for docs/deployment.md) here")
    p.add_argument("--plot", help="write the latency-against-sparsity plot here")
    return p.parse_args(argv)


def available_transforms(names: Sequence[str]) -> List[str]:
    registered = set(transform_names())
    keep = []
    for name in names:
        if name in registered:
            keep.append(name)
        else:
            print(f"note: transform {name!r} is not available in this build; skipped", file=sys.stderr)
    return keep


def export_models(args: argparse.Namespace, out_dir: str) -> List[BenchModel]:
    """Compile (at --compile-size) and export (at --image-size) every model; each export is verified."""
    torch.manual_seed(args.seed)
    dense = torchvision.models.resnet18().eval()
    small = torch.randn(1, 3, args.compile_size, args.compile_size)
    full = torch.randn(1, 3, args.image_size, args.image_size)
    sparsities = [float(s) for s in args.sparsity.split(",") if s.strip()]
    extra_forms = [f for f in args.forms.split(",") if f.strip()]
    jobs = [("none", 0.0, DEFAULT_FORM)]
    for transform in available_transforms([t for t in args.transforms.split(",") if t.strip()]):
        for s in sparsities:
            jobs.append((transform, s, DEFAULT_FORM))
            if transform == "parallel":
                jobs += [(transform, s, f) for f in extra_forms if f != DEFAULT_FORM]
    deepsparse = "auto" if "deepsparse" in args.engines else "skip"
    models = []
    for transform, s, form in jobs:
        label = "dense" if transform == "none" else f"{transform} {s:.2f}" + ("" if form == DEFAULT_FORM else f" [{form}]")
        path = os.path.join(out_dir, label.replace(" ", "-").replace("[", "").replace("]", "") + ".onnx")
        start = time.perf_counter()
        result = sift_compile(dense, transform, s, (small,), seed=args.seed, model_name="resnet18")
        info = export_onnx(result.module, (full,), path, form=form, deepsparse=deepsparse)
        v = info.verification
        err = v.errors.get("deepsparse-vs-onnxruntime")
        print(f"exported {label:28s} in {time.perf_counter() - start:5.1f} s; s' = "
              f"{result.report.effective_sparsity or 0:.4f}; DeepSparse vs onnxruntime: "
              f"{'%.2g' % err.rel if err else 'not run'}; supported ops {v.fraction_of_supported_ops}",
              file=sys.stderr, flush=True)
        models.append(BenchModel(label, path, transform, s, "resnet18", form if transform == "parallel" else ""))
    return models


def summary_markdown(results, args: argparse.Namespace) -> str:
    """The table for docs: per model, both engines, DS speedup over ORT and DS latency vs dense."""
    machine = machine_description()
    by = {(r.label, r.engine): r for r in results}
    dense_ds = by.get(("dense", "deepsparse"))
    lines = [f"Machine: {machine['cpu']}, {machine['logical_cores']} logical cores; DeepSparse "
             f"{machine.get('deepsparse', '-')}, onnxruntime {machine.get('onnxruntime', '-')}; batch "
             f"{args.batch_size}, {args.image_size} x {args.image_size}; {args.rounds} round(s) of {args.warmup} "
             f"warm-up + {args.iterations} timed batches per model and engine.", "",
             "| model | sparsity | DeepSparse ms (median / p90) | onnxruntime ms (median / p90) | "
             "DeepSparse speedup over onnxruntime | DeepSparse latency / dense |",
             "|---|---|---|---|---|---|"]
    for label in dict.fromkeys(r.label for r in results):
        ds, ort = by.get((label, "deepsparse")), by.get((label, "onnxruntime"))
        first = ds or ort
        cell = lambda r: f"{r.median_ms:.1f} / {r.p90_ms:.1f}" if r else "-"  # noqa: E731
        speedup = f"{ort.median_ms / ds.median_ms:.2f}x" if ds and ort else "-"
        relative = f"{ds.median_ms / dense_ds.median_ms:.2f}" if ds and dense_ds else "-"
        lines.append(f"| {label} | {first.sparsity if first.sparsity is not None else '-'} | {cell(ds)} | "
                     f"{cell(ort)} | {speedup} | {relative} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    engines = [e for e in args.engines.split(",") if e.strip()]
    if "deepsparse" in engines and not deepsparse_status()[0]:
        print(f"note: {deepsparse_status()[1]}; running onnxruntime alone", file=sys.stderr)
        engines.remove("deepsparse")
    for form in args.forms.split(","):
        if form.strip() and form not in FORMS:
            raise SystemExit(f"unknown form {form!r}: choose from {', '.join(FORMS)}")
    with tempfile.TemporaryDirectory(prefix="sift-r18-") as scratch:
        out_dir = args.out_dir or scratch
        os.makedirs(out_dir, exist_ok=True)
        models = export_models(args, out_dir)
        results = run_benchmarks(models, engines, args.batch_size, args.iterations, args.warmup, args.num_cores,
                                 rounds=args.rounds)
    print(results_table(results))
    summary = summary_markdown(results, args)
    print()
    print(summary)
    settings = {k: v for k, v in vars(args).items()}
    if args.json:
        write_text(args.json, json.dumps(results_json(results, settings), indent=2) + "\n")
    if args.markdown:
        write_text(args.markdown, summary)
    if args.plot:
        from sift_compiler.exporters.plot import plot_latency
        plot_latency(results, args.plot, f"ResNet-18, batch {args.batch_size}, {args.image_size}px")
    return 0


if __name__ == "__main__":
    sys.exit(main())
