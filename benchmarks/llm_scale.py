"""LLM scale: compile a 7B model on the meta device, every transform at several sparsities.

    python benchmarks/llm_scale.py compile                       # Llama-2 7B, s = 0.5 / 0.75 / 0.9
    python benchmarks/llm_scale.py compile --preset gpt3-small --sparsities 0.5,0.75 --json out.json

Each compile runs in a fresh process (``python benchmarks/llm_scale.py one ...``), so its wall time
and peak resident memory (``ru_maxrss`` of that process: Python, torch, transformers and the
compile; the model itself is never allocated) are its own. Printed per transform and sparsity:
compile seconds, peak RSS, weight FLOPs per token against the dense model's, all-op FLOPs per token
(attention scores grow under Sparse Wide), dense-equivalent and non-zero parameter counts, the
compensated s' and, for Sparse Wide, the widened channel groups (d_model, d_ff).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

TRANSFORMS = ("none", "parallel", "factorized", "doped", "wide")


def _one(preset: str, transform: str, sparsity: float, sequence: int) -> dict:
    """Build ``preset`` on meta and compile it; everything measured in this process."""
    import torch
    import sift_compiler as sift
    from sift_compiler.capture.sources import load_model
    start = time.perf_counter()
    source = load_model(f"transformers:{preset}", input_shape=(1, sequence), meta=True)
    result = sift.compile(source.module, transform, sparsity if transform != "none" else 0.0, source.args,
                          source.kwargs, model_name=preset)
    seconds = time.perf_counter() - start
    report = result.report
    floats = [p for p in result.module.parameters() if p.is_floating_point()]
    masked = dict(sift.sparsity.iter_masked(result.module))
    nonzero = sum(p.numel() for p in floats)
    for layer in masked.values():
        if layer.target_density < 1:
            nonzero -= layer.weight.numel() - sift.sparsity.exact_count(layer.target_density, layer.weight.numel())
    widths = next((n.split("widened: ", 1)[1] for n in report.notes if "channel groups widened" in n), "")
    return {"preset": preset, "transform": transform, "sparsity": sparsity, "seconds": seconds,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "output": result.output, "effective_sparsity": report.effective_sparsity,
            "weight_flops_per_token": report.sift_flops / sequence,
            "dense_weight_flops_per_token": report.dense_flops / sequence,
            "all_flops_per_token": report.total_sift_flops / sequence,
            "dense_all_flops_per_token": report.total_dense_flops / sequence,
            "parameters": sum(p.numel() for p in floats), "nonzero_parameters": nonzero, "widths": widths,
            "on_meta": all(t.is_meta for t in result.module.state_dict().values())}


def bench_compile(args: argparse.Namespace) -> list:
    rows = []
    jobs = [("none", 0.0)] + [(t, s) for t in TRANSFORMS[1:] for s in args.sparsities]
    for i, (transform, sparsity) in enumerate(jobs, 1):
        print(f"[{i}/{len(jobs)}] {args.preset} {transform} {sparsity:g} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, os.path.abspath(__file__), "one", args.preset, transform, str(sparsity),
               str(args.sequence)]
        run = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        if run.returncode:
            raise SystemExit(f"{transform} {sparsity}: failed\n{run.stderr[-3000:]}")
        rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
    dense = rows[0]
    print(f"\n{args.preset} on the meta device, sequence {args.sequence}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}\n")
    header = (f"{'transform':<11}{'s':>5}{'compile s':>11}{'peak RSS GB':>13}{'weight GFLOPs/token':>21}{'x dense':>9}"
              f"{'all GFLOPs/token':>18}{'x dense':>9}{'params (B)':>12}{'non-zero (B)':>14}{'s prime':>9}  widths")
    print(header)
    for row in rows:
        print(f"{row['transform']:<11}{row['sparsity']:>5g}{row['seconds']:>11.1f}{row['peak_rss_gb']:>13.2f}"
              f"{row['weight_flops_per_token'] / 1e9:>21.2f}"
              f"{row['weight_flops_per_token'] / dense['weight_flops_per_token']:>9.4f}"
              f"{row['all_flops_per_token'] / 1e9:>18.2f}{row['all_flops_per_token'] / dense['all_flops_per_token']:>9.4f}"
              f"{row['parameters'] / 1e9:>12.2f}{row['nonzero_parameters'] / 1e9:>14.2f}"
              f"{(row['effective_sparsity'] or 0):>9.4f}  {row['widths']}")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="compile on meta: time, memory, FLOPs and parameters per transform")
    c.add_argument("--preset", default="llama2-7b", help="gpt3-small, gpt3-xl or llama2-7b (default)")
    c.add_argument("--sparsities", type=lambda t: [float(x) for x in t.split(",")], default=[0.5, 0.75, 0.9])
    c.add_argument("--sequence", type=int, default=128, help="example sequence length (FLOPs are per token)")
    c.add_argument("--json", help="write the rows here")
    one = sub.add_parser("one", help=argparse.SUPPRESS)
    one.add_argument("preset")
    one.add_argument("transform")
    one.add_argument("sparsity", type=float)
    one.add_argument("sequence", type=int)
    args = p.parse_args(argv)
    if args.command == "one":
        print(json.dumps(_one(args.preset, args.transform, args.sparsity, args.sequence)))
        return 0
    rows = bench_compile(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": {"cpu": platform.processor(), "cores": os.cpu_count()}, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
