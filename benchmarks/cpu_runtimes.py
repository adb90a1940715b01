"""CPU runtimes side by side on Sparse Wide exports: DeepSparse, onnxruntime, OpenVINO (with and
without its sparse-weight option) and torch (eager, torch.compile, CSR linears).

Two models, each as its dense baseline and its Sparse Wide variant (compiled by sift, iso-FLOP,
random weights and masks, exported to verified masked ONNX plus the compiled ``.sift.pt`` the
torch runtimes run):

* ResNet-18 (torchvision), Sparse Wide s = 0.9, 224 x 224 images
* GPT-2 (4 layers, d_model 512, 8 heads, vocabulary 8192: small enough for a 2-core machine),
  Sparse Wide s = 0.75, 128 tokens

Every runtime times every file in the same run (`sift_compiler.exporters.bench.run_benchmarks`),
the whole sweep repeated ``--rounds`` times with the timings pooled, so load on a shared machine
lands on every file alike; medians are reported. The load average before and after is recorded.
Writes the raw results (JSON) and the markdown table of docs/deployment.md.

    python benchmarks/cpu_runtimes.py                                   # about 20 minutes on 2 cores
    python benchmarks/cpu_runtimes.py --models gpt2 --rounds 1 --iterations 2 --json /tmp/x.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Dict, List

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sift_compiler.exporters.bench import results_json, run_benchmarks  # noqa: E402
from sift_compiler.exporters.runtimes import ENGINES, engine_status  # noqa: E402
from sift_compiler.variants import export_variants  # noqa: E402
from sift_compiler.io import write_text  # noqa: E402
from sift_compiler import load  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "results")
MODELS = {
    "resnet18": dict(spec="torchvision:resnet18", shape=(1, 3, 224, 224), dtype=None, sparsity=0.9,
                     title="ResNet-18, Wide 0.9"),
    "gpt2": dict(spec="transformers:gpt2,n_layer=4,n_embd=512,n_head=8,vocab_size=8192,n_positions=256,bos_token_id=0,eos_token_id=0",
                 shape=(1, 128), dtype="int64", sparsity=0.75, title="GPT-2 (4 x 512), Wide 0.75"),
}
ZEROS = {  # what each runtime does with the exact zeros of a masked FP32 file
    "deepsparse": "sparse kernels: skips them (unstructured FP32 pays off from about 70-90%)",
    "onnxruntime": "computes them (dense MLAS GEMM/conv kernels)",
    "openvino": "computes them (dense oneDNN kernels)",
    "openvino-sparse": "stores weights compressed only for INT8 fully connected layers on AMX CPUs; FP32 as dense",
    "torch": "computes them (dense oneDNN/MKL)",
    "torch-compile": "computes them (inductor fuses the elementwise ops; GEMMs and convs dense)",
    "torch-csr": "skips them in Linear layers (MKL sparse CSR x dense); convolutions dense",
}


def export(names: List[str], out_dir: str, seed: int):
    models = []
    for name in names:
        m = MODELS[name]
        from sift_compiler.capture.sources import parse_dtype
        variants = export_variants(m["spec"], ["wide"], [m["sparsity"]], out_dir, input_shape=m["shape"],
                                   input_dtype=parse_dtype(m["dtype"]) if m["dtype"] else None, seed=seed,
                                   log=sys.stderr, save_compiled=True)
        for v in variants:
            v.model.family = name
            models.append(v.model)
    return models


def markdown(results, names: List[str], engines: List[str]) -> str:
    by = {(r.family, r.transform, r.engine): r for r in results}
    header = "| runtime |"
    rule = "|---|"
    for name in names:
        header += f" {MODELS[name]['title']}: dense ms | wide ms | wide / dense |"
        rule += "---|---|---|"
    lines = [header + " what it does with exact zeros |", rule + "---|"]
    for engine in engines:
        row = f"| {engine} |"
        for name in names:
            dense, wide = by.get((name, "none", engine)), by.get((name, "wide", engine))
            cells = []
            for r in (dense, wide):
                cells.append("failed" if r is not None and r.failed else "-" if r is None or not r.latencies_ms
                             else f"{r.median_ms:.1f}")
            ratio = f"{wide.median_ms / dense.median_ms:.2f}" if dense and wide and dense.latencies_ms \
                and wide.latencies_ms else "-"
            row += f" {cells[0]} | {cells[1]} | {ratio} |"
        lines.append(row + f" {ZEROS[engine]} |")
    failed = [f"- {r.label} on {r.engine}: {r.error}" for r in results if r.failed or r.skipped]
    return "\n".join(lines + ([""] + failed if failed else [])) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet18,gpt2", help="comma list of: " + ", ".join(MODELS))
    p.add_argument("--runtime", default=",".join(ENGINES), help="comma list (default: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--num-cores", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", help="keep the exported files here (default: a temporary directory)")
    p.add_argument("--json", default=os.path.join(RESULTS, "cpu-runtimes.json"))
    p.add_argument("--markdown", default=os.path.join(RESULTS, "cpu-runtimes.md"))
    args = p.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    engines = []
    for name in (e.strip() for e in args.runtime.split(",") if e.strip()):
        usable, reason = engine_status(name)
        if usable:
            engines.append(name)
        else:
            print(f"cpu_runtimes: {name} left out: {reason}", file=sys.stderr)
    load_before = os.getloadavg()
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="cpu-runtimes-") as tmp:
        out_dir = args.out_dir or tmp
        os.makedirs(out_dir, exist_ok=True)
        models = export(names, out_dir, args.seed)
        exported = time.time() - start
        results = run_benchmarks(models, engines, args.batch_size, args.iterations, args.warmup, args.num_cores,
                                 rounds=args.rounds, load_torch=lambda path: load(path).module)
    table = markdown(results, names, engines)
    print(table)
    settings: Dict[str, object] = {k: v for k, v in vars(args).items() if k not in ("json", "markdown", "out_dir")}
    settings.update(models={n: MODELS[n] for n in names}, engines=engines, load_before=load_before,
                    load_after=os.getloadavg(), export_s=round(exported, 1), total_s=round(time.time() - start, 1))
    write_text(args.json, json.dumps(results_json(results, settings), indent=2, default=str) + "\n")
    write_text(args.markdown, table)
    print(f"cpu_runtimes: wrote {args.json} and {args.markdown} (load {load_before[0]:.1f} before, "
          f"{settings['load_after'][0]:.1f} after; {settings['total_s']} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
