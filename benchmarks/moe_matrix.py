"""Mixture-of-experts models with every transform at s = 0.5 and 0.9: form, iso-FLOP per token, parameters.

    python benchmarks/moe_matrix.py                      # the table below
    SIFT_MOE_FULL=1 pytest tests/test_moe.py -n 0        # every invariant on the same matrix

Tiny configs of tests/test_moe.py (hidden 32, E = 8, top-2, random weights); one line per compile:
the result's form, the weight FLOPs per token (dense, sift, ratio), the total and per-token active
parameters (sift: stored / non-zero) and the compile time.
"""
from __future__ import annotations

import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import sift_compiler as sift  # noqa: E402
from sift_compiler.capture.sources import load_model  # noqa: E402
from test_moe import SPECS, TRANSFORMS  # noqa: E402


def main() -> None:
    print(f"{'model':<12}{'transform':<11}{'s':>4}  {'form':<7}{'dense/tok':>11}{'sift/tok':>11}{'ratio':>8}"
          f"{'params total':>14}{'active (nz)':>20}{'time':>7}")
    for name in ("mixtral", "qwen3_moe"):
        source = load_model(SPECS[name], input_shape=(1, 12))
        tokens = source.kwargs["input_ids"].shape[1]
        for transform in TRANSFORMS:
            for sparsity in (0.5, 0.9):
                torch.manual_seed(0)
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    result = sift.compile(source.module, transform, sparsity, (), source.kwargs, seed=0)
                seconds = time.perf_counter() - start
                r, p = result.report, result.report.parameters
                print(f"{name:<12}{transform:<11}{sparsity:>4}  {result.output:<7}{r.dense_flops / tokens:>11.0f}"
                      f"{r.sift_flops / tokens:>11.0f}{r.flop_ratio:>8.4f}{p['sift']['total']:>14,}"
                      f"{p['sift']['active']:>11,} ({p['sift']['active_nonzero']:,}){seconds:>6.1f}s")


if __name__ == "__main__":
    main()
