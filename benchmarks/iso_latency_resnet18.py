"""Iso-latency on DeepSparse: the largest Sparse Wide / Parallel ResNet-18 at s = 0.9 that runs as fast as dense.

For each transform, batch size and latency budget (latency at most R x the dense model's) it runs
the search of `sift_compiler.latency` (dense and candidates timed side by side in interleaved
rounds, on DeepSparse in its worker process) and records the chosen capacity (Wide's k, Parallel's
B), its measured latency ratio and its FLOPs relative to the dense model (the iso-FLOP model is
1.0). ``--plot`` draws capacity against the budget (the curve in docs/deployment.md).

    python benchmarks/iso_latency_resnet18.py --batch-sizes 16,64 --ratios 1.0 --json iso-latency.json
    python benchmarks/iso_latency_resnet18.py --batch-sizes 16 --ratios 1.0,1.25,1.5 --plot curve.png
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional, Sequence

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")

import torch  # noqa: E402
import torchvision  # noqa: E402

from sift_compiler.config import CompileConfig  # noqa: E402
from sift_compiler.exporters.bench import machine_description  # noqa: E402
from sift_compiler.api import compile_for_latency  # noqa: E402
from sift_compiler.latency import LatencyBudget, iso_flop_capacity  # noqa: E402


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--transforms", default="wide,parallel")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--batch-sizes", default="16")
    p.add_argument("--ratios", default="1.0", help="latency budgets, multiples of the dense latency")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--runtime", default="deepsparse")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=5)
    p.add_argument("--tolerance", type=float, default=0.05)
    p.add_argument("--round-to", type=int, default=1, help="Sparse Wide channel multiple")
    p.add_argument("--json", help="write every search here")
    p.add_argument("--markdown", help="write the summary table here")
    p.add_argument("--plot", help="write capacity against latency budget here (.png)")
    return p.parse_args(argv)


def plot(rows: List[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for (transform, batch) in sorted({(r["transform"], r["batch_size"]) for r in rows}):
        points = sorted((r["ratio"], r["capacity"], r["flop_ratio"]) for r in rows
                        if r["transform"] == transform and r["batch_size"] == batch)
        label = f"{transform}, batch {batch}"
        iso = iso_flop_capacity(transform, rows[0]["sparsity"])
        axes[0].plot([p[0] for p in points], [p[1] / iso for p in points], "o-", label=label)
        axes[1].plot([p[0] for p in points], [p[2] for p in points], "o-", label=label)
    axes[0].set(xlabel="latency budget (x dense)", ylabel="capacity / iso-FLOP capacity",
                title="capacity DeepSparse can afford")
    axes[1].set(xlabel="latency budget (x dense)", ylabel="weight FLOPs / dense", title="FLOPs it can afford")
    for ax in axes:
        ax.axhline(1.0, color="gray", ls="--", lw=0.8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("ResNet-18, s = 0.9, DeepSparse (dashed: iso-FLOP)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    x = torch.randn(1, 3, args.image_size, args.image_size)
    rows: List[dict] = []
    searches = []
    measured = {}  # (transform, batch) -> {capacity: probe}: one measurement per capacity serves every budget
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        for transform in args.transforms.split(","):
            for ratio in [float(r) for r in args.ratios.split(",")]:
                torch.manual_seed(0)
                model = torchvision.models.resnet18().eval()
                budget = LatencyBudget(batch_size=batch, ratio=ratio, rounds=args.rounds, iterations=args.iterations,
                                       max_steps=args.max_steps, tolerance=args.tolerance)
                start = time.perf_counter()
                print(f"== {transform} s={args.sparsity} batch {batch} budget {ratio}x", file=sys.stderr, flush=True)
                config = CompileConfig(transform=transform, sparsity=args.sparsity, seed=0, round_to=args.round_to,
                                       budget="latency")
                result = compile_for_latency(model, config, (x,), None, args.runtime, budget,
                                             {"model_name": "resnet18"},
                                             log=sys.stderr,
                                             measured=measured.setdefault((transform, batch), {}))
                search = result.latency
                print(search.table(), flush=True)
                rows.append({"transform": transform, "batch_size": batch, "ratio": ratio, "capacity": search.capacity,
                             "latency_ratio": search.latency_ratio, "flop_ratio": search.flop_ratio,
                             "iso_flop_capacity": search.iso_flop_capacity, "sparsity": args.sparsity,
                             "seconds": time.perf_counter() - start,
                             "note": search.note})
                searches.append(search.to_dict())
                del result
    lines = ["| transform | batch | budget | capacity (iso-FLOP) | latency / dense | FLOPs / dense |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        unit = "k" if r["transform"] == "wide" else "B"
        lines.append(f"| {r['transform']} | {r['batch_size']} | {r['ratio']:g}x | {unit} = {r['capacity']:.3g} "
                     f"({r['iso_flop_capacity']:.3g}) | {r['latency_ratio']:.3f} | {r['flop_ratio']:.3f} |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_description(), "settings": vars(args), "rows": rows,
                       "searches": searches}, f, indent=2, default=str)
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
