"""2:4 Sparse Wide on a GPU: dense vs Sparse Wide (2:4, torch semi-structured kernels) vs Sparse
Wide dense-masked, on transformer MLP stacks (GPT-2-style GELU and Llama-style SwiGLU), fp16 and bf16.

Each model is an input projection, ``--blocks`` pre-norm MLP blocks with residuals and an output
projection (the input and output layers stay dense, as Sparse Wide keeps first and last layers).
Sparse Wide is compiled by sift at s = 0.5 with ``pattern="2:4"`` (k = sqrt 2, widths rounded to
64 so every backend tiles them), then run three ways:

* ``wide 2:4``: `sift_compiler.deploy.to_semi_structured` (cuSPARSELt, or CUTLASS without it)
* ``wide masked``: the compiled module as trained (``W * M`` every forward, dense GEMMs)
* ``wide baked``: masks baked into plain ``nn.Linear`` weights (dense GEMMs over exact zeros)
* ``wide 2:4 torchao``: (when torchao is installed) torchao's ``sparsify_(..., semi_sparse_weight())``

Forward latency of one batch of ``--tokens`` tokens under ``torch.no_grad()``, CUDA events, the
variants interleaved over ``--rounds`` rounds (median of each round's median); ratios are against
the dense model of the same dtype. The 2:4 output is checked against the baked model's.

    python benchmarks/sparse24_gpu.py                      # about 1-2 minutes on an A100/H100/H200
    python benchmarks/sparse24_gpu.py --models gpt2 --dtypes fp16 --tokens 4096 --json out.json

Without CUDA (or on a GPU older than compute capability 8.0) it prints that it did not run and
why, writes nothing and exits 0. ``--plan-only`` builds the models and prints which layers the
swap would take, on any machine (no timing).
"""
from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sift_compiler as sift  # noqa: E402
from sift_compiler.deploy import cuda_unavailable_reason, semi_structured_plan, to_semi_structured  # noqa: E402
from sift_compiler.exporters import bake_masks  # noqa: E402

DEFAULT_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "results", "sparse24-gpu.json")
MODELS = {"gpt2": dict(d_model=1024, ffn=4096, gated=False),      # GPT-2 medium's MLP widths
          "llama": dict(d_model=2048, ffn=5632, gated=True)}      # TinyLlama-1.1B's MLP widths
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class MLPBlock(nn.Module):
    def __init__(self, d_model: int, ffn: int, gated: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.up = nn.Linear(d_model, ffn)
        self.gate = nn.Linear(d_model, ffn) if gated else None
        self.down = nn.Linear(ffn, d_model)

    def forward(self, x):
        h = self.norm(x)
        h = F.silu(self.gate(h)) * self.up(h) if self.gate is not None else F.gelu(self.up(h))
        return x + self.down(h)


class MLPStack(nn.Module):
    def __init__(self, d_model: int, ffn: int, gated: bool, blocks: int) -> None:
        super().__init__()
        self.inp = nn.Linear(d_model, d_model)
        self.blocks = nn.ModuleList(MLPBlock(d_model, ffn, gated) for _ in range(blocks))
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.out(h)


@functools.lru_cache(maxsize=1)  # one model at a time: fp16 and bf16 share its compile
def build(name: str, blocks: int, seed: int):
    """(dense model, 2:4 Sparse Wide compile result), fp32 on the CPU."""
    torch.manual_seed(seed)
    dense = MLPStack(blocks=blocks, **MODELS[name]).eval()
    x = torch.randn(8, MODELS[name]["d_model"])
    result = sift.compile(dense, "wide", 0.5, (x,), pattern="2:4", round_to=64, seed=seed, output="native")
    return dense, result


def time_forward(model: nn.Module, x: torch.Tensor, warmup: int, iterations: int) -> float:
    """Median forward latency in ms over ``iterations`` runs (CUDA events)."""
    with torch.no_grad():
        for _ in range(warmup):
            model(x)
        torch.cuda.synchronize()
        times = []
        for _ in range(iterations):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(name: str, dtype_name: str, args) -> Dict[str, object]:
    dtype = DTYPES[dtype_name]
    dense, result = build(name, args.blocks, args.seed)
    widths = {"d_model": result.module.inp.out_features, "ffn": result.module.blocks[0].up.out_features}
    device = torch.device("cuda")
    variants = {"dense": copy.deepcopy(dense).to(device, dtype),
                "wide masked": copy.deepcopy(result.module).to(device, dtype),
                "wide baked": bake_masks(result.module).to(device, dtype)}
    plan = semi_structured_plan(variants["wide masked"], dtype)
    variants["wide 2:4"] = to_semi_structured(copy.deepcopy(variants["wide masked"]), dtype, strict=True)
    torchao_error = ""
    if importlib.util.find_spec("torchao") is not None:  # torchao's 2:4 path, when installed, for comparison
        try:
            from torchao.sparsity import semi_sparse_weight, sparsify_
            swapped = {p.name for p in plan if p.swapped}
            variants["wide 2:4 torchao"] = copy.deepcopy(variants["wide baked"])
            sparsify_(variants["wide 2:4 torchao"], semi_sparse_weight(), filter_fn=lambda m, fqn: fqn in swapped)
        except Exception as e:  # an API change must not cost the other numbers
            variants.pop("wide 2:4 torchao", None)
            torchao_error = f"{type(e).__name__}: {e}"
    x = torch.randn(args.tokens, MODELS[name]["d_model"], device=device, dtype=dtype)
    with torch.no_grad():
        reference = variants["wide baked"](x).float()
        got = variants["wide 2:4"](x).float()
    error = float((got - reference).abs().max() / reference.abs().max())
    if "wide 2:4 torchao" in variants:
        with torch.no_grad():
            got_ao = variants["wide 2:4 torchao"](x).float()
        torchao_error = f"max relative error vs baked {float((got_ao - reference).abs().max() / reference.abs().max()):.1e}"
    per_round: Dict[str, List[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for label, model in variants.items():
            per_round[label].append(time_forward(model, x, args.warmup, args.iterations))
    ms = {label: statistics.median(values) for label, values in per_round.items()}
    return {"model": name, "dtype": dtype_name, "tokens": args.tokens, "blocks": args.blocks,
            "dense_widths": {k: MODELS[name][k] for k in ("d_model", "ffn")}, "wide_widths": widths,
            "swapped_layers": sum(p.swapped for p in plan), "sparse_layers": len(plan),
            "max_rel_error_24_vs_baked": error, "torchao": torchao_error or "not installed", "median_ms": ms, "rounds_ms": per_round,
            "vs_dense": {label: ms[label] / ms["dense"] for label in ms}}


def print_table(rows: List[Dict[str, object]]) -> None:
    labels = ["dense", "wide 2:4", "wide masked", "wide baked"]
    labels += ["wide 2:4 torchao"] if all("wide 2:4 torchao" in r["median_ms"] for r in rows) else []
    print(f"{'model':<6} {'dtype':<5} " + " ".join(f"{label + ' ms':>15}" for label in labels)
          + " " + " ".join(f"{label + ' / dense':>19}" for label in labels[1:]) + "  2:4 err")
    for r in rows:
        ms, ratio = r["median_ms"], r["vs_dense"]
        print(f"{r['model']:<6} {r['dtype']:<5} " + " ".join(f"{ms[label]:>15.3f}" for label in labels)
              + " " + " ".join(f"{ratio[label]:>19.3f}" for label in labels[1:]) + f"  {r['max_rel_error_24_vs_baked']:.1e}")
    for r in rows:
        print(f"torchao ({r['model']} {r['dtype']}): {r['torchao']}")
    print("wide 2:4 / wide baked (what 2:4 kernels buy on the same wide model): "
          + ", ".join(f"{r['model']} {r['dtype']} {r['median_ms']['wide 2:4'] / r['median_ms']['wide baked']:.3f}"
                      for r in rows))


def machine() -> Dict[str, object]:
    from sift_compiler.deploy import backend_shape_multiple
    return {"gpu": torch.cuda.get_device_name(0), "capability": list(torch.cuda.get_device_capability(0)),
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "backend": backend_shape_multiple(torch.float16)[0],
            "cusparselt": torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None}


def plan_only(args) -> int:
    for name in args.models:
        _, result = build(name, args.blocks, args.seed)
        plan = semi_structured_plan(result.module)
        print(f"{name}: k = {math.sqrt(2):.4f}, widths d_model {MODELS[name]['d_model']} -> "
              f"{result.module.inp.out_features}, ffn {MODELS[name]['ffn']} -> {result.module.blocks[0].up.out_features}; "
              f"{sum(p.swapped for p in plan)} of {len(plan)} sparse layers would take 2:4 weights")
        for p in plan:
            print(f"  {p.name:<20} {p.shape[0]}x{p.shape[1]}  {'2:4' if p.swapped else p.reason}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="gpt2,llama", help="comma list of: " + ", ".join(MODELS))
    p.add_argument("--dtypes", default="fp16,bf16", help="comma list of: fp16, bf16")
    p.add_argument("--blocks", type=int, default=4, help="MLP blocks per model (default 4)")
    p.add_argument("--tokens", type=int, default=8192, help="tokens per batch (default 8192: 8 x 1024)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--iterations", type=int, default=20, help="timed forwards per variant and round (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed forwards first (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=DEFAULT_JSON, help="raw results (default docs/results/sparse24-gpu.json)")
    p.add_argument("--plan-only", action="store_true", help="build the models, print the swap plan, time nothing")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not set(args.models) <= set(MODELS) or not set(args.dtypes) <= set(DTYPES):
        p.error(f"--models from {', '.join(MODELS)}, --dtypes from {', '.join(DTYPES)}")
    if args.plan_only:
        return plan_only(args)
    reason = cuda_unavailable_reason(torch.device("cuda")) if torch.cuda.is_available() else cuda_unavailable_reason()
    if reason:
        print(f"sparse24_gpu: DID NOT RUN: {reason}. Nothing was measured or written.")
        return 0
    start = time.time()
    info = machine()
    print(f"sparse24_gpu: {info['gpu']} (sm_{info['capability'][0]}{info['capability'][1]}), torch {info['torch']}, "
          f"CUDA {info['cuda']}, 2:4 backend {info['backend']}; {args.tokens} tokens, {args.blocks} blocks, "
          f"{args.rounds} rounds x {args.iterations} forwards", flush=True)
    rows = []
    for name in args.models:
        for dtype_name in args.dtypes:
            rows.append(measure(name, dtype_name, args))
            r = rows[-1]
            print(f"  {name} {dtype_name}: dense {r['median_ms']['dense']:.3f} ms, wide 2:4 "
                  f"{r['median_ms']['wide 2:4']:.3f} ms ({r['swapped_layers']}/{r['sparse_layers']} layers 2:4), "
                  f"error {r['max_rel_error_24_vs_baked']:.1e}", flush=True)
            torch.cuda.empty_cache()
    print()
    print_table(rows)
    data = {"machine": info, "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "seconds": round(time.time() - start, 1), "results": rows}
    from sift_compiler.io import write_text
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    write_text(args.json, json.dumps(data, indent=2) + "\n")
    print(f"\nsparse24_gpu: wrote {os.path.relpath(args.json)} ({data['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
