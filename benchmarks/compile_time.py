"""Compile time of sift-compiler against the cheapest way to capture a model, measured side by side.

For each model: t_compile = sift.compile(model, T, 0.75, inputs); t_base = a plain capture of the
model with the tracer it needs (torch.fx.symbolic_trace; torch.export.export for transformers 5.x,
which fx cannot trace) plus one forward pass of the dense model. Target: t_compile / t_base <= 3.
Both are measured interleaved (base, compile, base, compile...) after one warm-up, best of
--repeats, in wall and in CPU seconds: on a shared machine the ratio of one run is what compares.

    python benchmarks/compile_time.py [--transform parallel] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import platform
import time
import warnings
from typing import Tuple

import torch

import sift_compiler as sift
from sift_compiler.capture.sources import load_model

MODELS = {
    "resnet50": ("torchvision:resnet50", (1, 3, 224, 224)),
    "vit_b_16": ("torchvision:vit_b_16", (1, 3, 224, 224)),
    "gpt2": ("transformers:gpt2", (1, 128)),
}


def timed(fn) -> Tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def baseline(source) -> None:
    model = source.module.eval()
    if source.family == "transformers":
        torch.export.export(model, (), {**source.kwargs, "use_cache": False}, strict=False)  # no KV cache object out
    else:
        torch.fx.symbolic_trace(model)
    with torch.no_grad():
        model(*source.args, **source.kwargs)


def measure(source, transform: str, repeats: int):
    """(best base (wall, cpu), best compile (wall, cpu), the fastest compile's `timings`), interleaved
    after a warm-up."""
    timed(lambda: baseline(source))
    bases, compiles, timings = [], [], []
    for _ in range(repeats):
        bases.append(timed(lambda: baseline(source)))
        compiles.append(timed(lambda: timings.append(
            sift.compile(source.module, transform, 0.75, source.args, source.kwargs).timings)))
    best = lambda runs: (min(r[0] for r in runs), min(r[1] for r in runs))  # noqa: E731
    fastest = min(range(repeats), key=lambda i: compiles[i][0])
    return best(bases), best(compiles), timings[fastest]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transform", default="parallel")
    parser.add_argument("--repeats", type=int, default=3, help="best of N for both timings")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; transform {args.transform}, s = 0.75")
    print(f"{'model':<10}{'capture+forward s':>20}{'sift.compile s':>16}{'ratio':>8}{'CPU ratio':>11}  where it goes (s)")
    for name in args.models:
        spec, shape = MODELS[name]
        source = load_model(spec, input_shape=shape)
        (base, base_cpu), (sift_time, sift_cpu), timings = measure(source, args.transform, args.repeats)
        where = ", ".join(f"{step} {seconds:.2f}" for step, seconds in timings.items() if seconds >= 0.01)
        print(f"{name:<10}{base:>20.3f}{sift_time:>16.2f}{sift_time / base:>8.2f}{sift_cpu / base_cpu:>11.2f}  {where}",
              flush=True)


if __name__ == "__main__":
    main()
