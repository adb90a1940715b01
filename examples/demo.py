"""`make demo`: compile torchvision:resnet18 with every transform at s = 0.75 and export ONNX.

Runs the real command-line tool for each transform, so this is exactly what a user types:

    sift-compile torchvision:resnet18 --transform T --sparsity 0.75 --onnx demo-out/resnet18-T.onnx \
        --report demo-out/resnet18-T.json
"""
from __future__ import annotations

import os
import sys
import time

from sift_compiler.cli.compile import main as sift_compile

OUT = os.environ.get("SIFT_DEMO_OUT", "demo-out")
TRANSFORMS = ["none", "wide", "parallel", "factorized", "doped"]


def run() -> int:
    os.makedirs(OUT, exist_ok=True)
    summary = []
    for transform in TRANSFORMS:
        print(f"\n=== sift-compile torchvision:resnet18 --transform {transform} --sparsity 0.75 ===", flush=True)
        argv = ["torchvision:resnet18", "--transform", transform, "--max-layers", "12",
                "--onnx", f"{OUT}/resnet18-{transform}.onnx", "--report", f"{OUT}/resnet18-{transform}.json"]
        if transform != "none":
            argv += ["--sparsity", "0.75"]
        start = time.perf_counter()
        code = sift_compile(argv)
        if code != 0:
            print(f"demo: sift-compile failed for {transform} (exit {code})", file=sys.stderr)
            return code
        summary.append((transform, time.perf_counter() - start))
    print("\ndemo: wrote", ", ".join(f"{OUT}/resnet18-{t}.onnx" for t in TRANSFORMS))
    for transform, seconds in summary:
        print(f"  {transform:<11} compiled, reported and exported in {seconds:5.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run())
