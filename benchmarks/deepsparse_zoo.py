"""The deployment zoo run: many torchvision and timm architectures x the four transforms, exported with
DeepSparse checks on, in ONE process that must never die.

For each architecture (random weights, small inputs where the model allows them) and each transform
at s = 0.75 it does what ``sift-compile MODEL -t T -s 0.75 --onnx m.onnx`` does (compile, export
with the outcome policy, remedies that recompile included) and records the outcome:

    ok                   every check holds as exported
    remedied             a remedy (export form, channel rounding) made DeepSparse verify the file
    not-for-deepsparse   the file is correct for onnxruntime, DeepSparse must not run it (marked)
    failed               no file: compile or export refused (the reason), or the calling process
                         met an exception it did not expect (counted separately: must stay 0)

DeepSparse aborts inside its compiler on some of these graphs; they run in the worker process, so
this process only sees one line. The ONNX files are deleted after each model.

    python benchmarks/deepsparse_zoo.py --json zoo.json --markdown zoo.md      # about an hour on 2 cores
    python benchmarks/deepsparse_zoo.py --models torchvision:resnet18 --transforms doped   # one row
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")

import torch  # noqa: E402

from sift_compiler import compile as sift_compile  # noqa: E402
from sift_compiler.capture.sources import load_model  # noqa: E402
from sift_compiler.errors import SiftError, first_line  # noqa: E402
from sift_compiler.exporters.remedies import export_with_compile_remedies  # noqa: E402
from sift_compiler.exporters.runtimes import deepsparse_status  # noqa: E402

# (spec, input shape): small inputs where the architecture allows them; 224 where it needs it
ZOO = [
    ("torchvision:resnet18", (1, 3, 64, 64)), ("torchvision:resnet50", (1, 3, 64, 64)),
    ("torchvision:mobilenet_v2", (1, 3, 64, 64)), ("torchvision:mobilenet_v3_small", (1, 3, 64, 64)),
    ("torchvision:efficientnet_b0", (1, 3, 64, 64)), ("torchvision:regnet_x_400mf", (1, 3, 64, 64)),
    ("torchvision:regnet_y_400mf", (1, 3, 64, 64)), ("torchvision:shufflenet_v2_x1_0", (1, 3, 64, 64)),
    ("torchvision:squeezenet1_1", (1, 3, 64, 64)), ("torchvision:densenet121", (1, 3, 64, 64)),
    ("torchvision:mnasnet0_5", (1, 3, 64, 64)), ("torchvision:convnext_tiny", (1, 3, 64, 64)),
    ("torchvision:resnext50_32x4d", (1, 3, 64, 64)), ("torchvision:swin_t", (1, 3, 224, 224)),
    ("timm:resnet10t", (1, 3, 64, 64)), ("timm:convnext_atto", (1, 3, 64, 64)),
    ("timm:regnetx_002", (1, 3, 64, 64)), ("timm:ghostnet_100", (1, 3, 64, 64)),
    ("timm:mixnet_s", (1, 3, 64, 64)), ("timm:lcnet_050", (1, 3, 64, 64)),
    ("timm:repvgg_a0", (1, 3, 64, 64)), ("timm:resnet18d", (1, 3, 64, 64)),
    ("timm:mobilenetv3_small_050", (1, 3, 64, 64)), ("timm:deit_tiny_patch16_224", (1, 3, 224, 224)),
]
TRANSFORMS = ("wide", "parallel", "factorized", "doped")


def run_one(spec: str, shape, transform: str, sparsity: float, out_dir: str) -> Dict[str, object]:
    """Compile and export one model as sift-compile does; the outcome and its reason."""
    row: Dict[str, object] = {"model": spec, "transform": transform, "input": list(shape)}
    start = time.perf_counter()
    path = os.path.join(out_dir, "model.onnx")
    try:
        torch.manual_seed(0)
        source = load_model(spec, tuple(shape))
        options = dict(seed=0, model_name=spec)

        def compile_with(**changes):
            return sift_compile(source.module, transform, sparsity, source.args, source.kwargs, **{**options, **changes})
        result = compile_with()
        _, info, recompiled = export_with_compile_remedies(result, compile_with, source.args, path, source.kwargs)
        row["outcome"] = info.outcome
        if info.outcome == "remedied":
            row["reason"] = info.notes[0] if info.notes else recompiled
        elif info.outcome == "not-for-deepsparse":
            row["reason"] = info.deepsparse_reason
        elif info.outcome == "unchecked":
            row["reason"] = "DeepSparse did not check the file"
    except SiftError as e:
        row.update(outcome="failed", reason=f"{type(e).__name__}: {first_line(e, 400)}")
    except Exception as e:  # noqa: BLE001  (counted: the run's own robustness is what is measured)
        row.update(outcome="failed", internal=True, reason=f"{type(e).__name__}: {first_line(e, 400)}")
    finally:
        for name in os.listdir(out_dir):
            os.remove(os.path.join(out_dir, name))
        gc.collect()
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def _short(text: str, limit: int = 150) -> str:
    text = str(text).replace("|", "/")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def markdown(rows: Sequence[Dict[str, object]]) -> str:
    lines = ["| model | input | transform | outcome | reason |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {'x'.join(map(str, r['input'][2:]))} | {r['transform']} | {r['outcome']} | "
                     f"{_short(r.get('reason', ''))} |")
    return "\n".join(lines)


def counts(rows: Sequence[Dict[str, object]]) -> Dict[str, int]:
    tally: Dict[str, int] = {}
    for r in rows:
        tally[str(r["outcome"])] = tally.get(str(r["outcome"]), 0) + 1
    tally["internal errors"] = sum(1 for r in rows if r.get("internal"))
    return tally


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", help="specs to run (default: the zoo list)")
    p.add_argument("--transforms", default=",".join(TRANSFORMS))
    p.add_argument("--sparsity", type=float, default=0.75)
    p.add_argument("--json", help="write every row here (rewritten after each row)")
    p.add_argument("--markdown", help="write the table here")
    args = p.parse_args(argv)
    usable, reason = deepsparse_status()
    if not usable:
        print(f"note: {reason}; outcomes are 'unchecked'", file=sys.stderr)
    zoo = [(m, dict(ZOO).get(m, (1, 3, 64, 64))) for m in args.models] if args.models else ZOO
    transforms = [t for t in args.transforms.split(",") if t]
    rows: List[Dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="sift-zoo-") as out_dir:
        for spec, shape in zoo:
            for transform in transforms:
                row = run_one(spec, shape, transform, args.sparsity, out_dir)
                rows.append(row)
                print(f"{spec:<34} {transform:<10} {row['outcome']:<18} {row['seconds']:>6}s  "
                      f"{_short(row.get('reason', ''), 200)}", flush=True)
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump({"sparsity": args.sparsity, "rows": rows, "counts": counts(rows)}, f, indent=2)
    print("\n" + markdown(rows))
    print("\ncounts: " + ", ".join(f"{k} {v}" for k, v in counts(rows).items()))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(rows) + "\n\ncounts: " + ", ".join(f"{k} {v}" for k, v in counts(rows).items()) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
