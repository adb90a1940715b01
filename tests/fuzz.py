"""`make fuzz`: every transform on 1,000 random models with every check; a summary table at the end.

    python tests/fuzz.py [--examples 1000] [--seed 2024] [--transforms wide,parallel,factorized,doped]
                         [--failures fuzz-failures.json]

Models come from `fuzz_models.cases()` (hypothesis, fixed seed: every transform sees the same
models), and each is checked by `fuzz_models.check`: compile, forward and backward, output shapes,
exact masks, gradients only on unmasked weights, the report's FLOPs against FlopCounterMode x
non-zeros, iso-FLOP within 0.5% (or the exact-count rounding bound) of the dense model by the
same independent count, ONNX (exported without the exporter's own checks) in onnxruntime against
torch, and for Sparse Wide a consistent widened graph. Exit status 1 if any case failed.

It lives with the tests, not in benchmarks/: it checks correctness with the tests' helpers
(checks.py, the generator it shares with test_fuzz_smoke.py); benchmarks/ measure speed.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")

import torch  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import seed as fixed_seed  # noqa: E402

import fuzz_models as fm  # noqa: E402


def run(transform: str, examples: int, seed: int, workdir: str, failures: list) -> tuple:
    outcomes, start = [], time.perf_counter()

    @fixed_seed(seed)
    @settings(max_examples=examples, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(fm.cases())
    def one(case):
        spec, sparsity, options, model_seed = case
        outcome = fm.check(spec, transform, sparsity, workdir, model_seed, options)
        outcomes.append(outcome)
        if outcome.failed:
            failures.append({"transform": transform, "kind": outcome.kind, "detail": outcome.detail, "spec": spec,
                             "sparsity": sparsity, "options": options, "seed": model_seed})
            print(f"[{transform}] FAIL {outcome.kind}: {outcome.detail[:300]}\n    case: {json.dumps(failures[-1])}",
                  flush=True)
        if len(outcomes) % 25 == 0:
            print(f"[{transform}] {len(outcomes)}/{examples}  ok {sum(o.kind == 'ok' for o in outcomes)}  "
                  f"refused {sum(o.kind == 'refused' for o in outcomes)}  failed {sum(o.failed for o in outcomes)}  "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
            gc.collect()

    one()
    return outcomes, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000, help="models per transform (default 1000)")
    parser.add_argument("--seed", type=int, default=2024, help="hypothesis seed (default 2024)")
    parser.add_argument("--transforms", default=",".join(fm.TRANSFORMS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--failures", help="write the failing cases here as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    outcomes, seconds, failures = {}, {}, []
    with tempfile.TemporaryDirectory() as workdir:
        for transform in args.transforms.split(","):
            outcomes[transform], seconds[transform] = run(transform, args.examples, args.seed, workdir, failures)
    print("\n" + fm.summarize(outcomes, seconds))
    if args.failures:
        with open(args.failures, "w") as f:
            json.dump(failures, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
