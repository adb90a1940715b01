"""FSDP2 training step of a sift model on 2 CPU ranks (gloo): masked RigL against the same model without sift.

A small Llama (default: 4 decoder layers, hidden 256, FFN 688, 8 heads, sequence 128, vocabulary
4000) compiled with Sparse Wide at s = 0.75 is trained under ``torch.distributed.fsdp.fully_shard``
(every decoder layer, then the root) two ways, with the same shapes and the same batches:

- **plain**: every masked layer replaced by its plain layer (same weights), no engine;
- **sift**: the masked layers (``W * M``, masks sharded with their weights) and RigL.

Rounds alternate between the two (``--steps`` steps each, after a warm-up) and medians are
reported, so both see the same machine load. Printed: the median step time of each and their
ratio (goal <= 1.10), and RigL's update cost: update steps (dense gradient, global top-k over the
shards, re-masking) are timed on their own, and their extra time over an ordinary step is
amortised over the paper's update interval of 100 steps (goal < 5%).

    python benchmarks/fsdp_step.py [--rounds 5] [--steps 6] [--layers 4] [--hidden 256]

It launches itself with ``torch.distributed.run --nproc_per_node 2`` (one torch thread per rank).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time


def _worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    import sift_compiler as sift
    from sift_compiler.distributed import fully_shard_model
    from sift_compiler.exporters import bake_masks
    from sift_compiler.sparsity import count_parameters, iter_masked

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=args.layers, hidden_size=args.hidden, intermediate_size=args.ffn,
                         num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
                         max_position_embeddings=args.sequence)
    ids = torch.randint(0, args.vocab, (1, args.sequence))
    compiled = sift.compile(LlamaForCausalLM(config), args.transform, args.sparsity,
                            example_kwargs={"input_ids": ids}, seed=0).module

    variants = {}
    for name in ("plain", "sift"):
        model = (bake_masks(compiled) if name == "plain" else copy.deepcopy(compiled)).train()
        fully_shard_model(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        engine = sift.sparsity.RigL(model, opt, total_steps=10 ** 6, update_interval=args.update_interval) \
            if name == "sift" else None
        variants[name] = (model, opt, engine)
    gen = torch.Generator().manual_seed(1 + rank)

    def step(name: str) -> tuple:
        model, opt, engine = variants[name]
        batch = torch.randint(0, args.vocab, (args.batch, args.sequence), generator=gen)
        dist.barrier()
        start = time.perf_counter()
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        engine_start = time.perf_counter()
        updated = engine.step() if engine is not None else False
        engine_seconds = time.perf_counter() - engine_start
        opt.zero_grad(set_to_none=True)
        dist.barrier()
        return time.perf_counter() - start, updated, engine_seconds

    for name in variants:  # warm-up
        for _ in range(2):
            step(name)
    times = {"plain": [], "sift": [], "update": [], "engine": []}
    for r in range(args.rounds):
        for name in ("plain", "sift"):
            for _ in range(args.steps):
                seconds, updated, engine_seconds = step(name)
                times["update" if updated else name].append(seconds)
                if name == "sift" and not updated:
                    times["engine"].append(engine_seconds)
        if rank == 0:
            print(f"round {r + 1}/{args.rounds}: plain {statistics.median(times['plain']):.3f} s, "
                  f"sift {statistics.median(times['sift']):.3f} s", file=sys.stderr, flush=True)
    while len(times["update"]) < 3:  # enough update steps to time
        seconds, updated, _ = step("sift")
        times["update" if updated else "sift"].append(seconds)
    shards = [(int(layer.weight_mask.to_local().numel()), int(layer.weight_mask.numel()))
              for _, layer in iter_masked(variants["sift"][0])]
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"times": times, "shards": shards,
                       "parameters": count_parameters(compiled).total}, f)
    dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--transform", default="wide")
    p.add_argument("--sparsity", type=float, default=0.75)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=688)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4000)
    p.add_argument("--sequence", type=int, default=128)
    p.add_argument("--batch", type=int, default=4, help="sequences per rank per step")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=6, help="steps per variant per round")
    p.add_argument("--update-interval", type=int, default=4,
                   help="RigL interval in this run (short, to time several updates); the overhead is "
                        "reported amortised over 100 steps")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.abspath(__file__), "--worker", "--out", out, *forwarded]
        run = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1", NM_DISABLE_ANALYTICS="1"))
        if run.returncode:
            return run.returncode
        with open(out) as f:
            result = json.load(f)
    times, median = result["times"], statistics.median
    plain, sift_step, update = median(times["plain"]), median(times["sift"]), median(times["update"])
    amortised = (update - sift_step) / (100 * sift_step)
    print(f"\nFSDP2, 2 ranks (gloo, 1 thread each) on {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; Llama {args.layers} layers, hidden {args.hidden}, FFN {args.ffn}, "
          f"sequence {args.sequence}, batch {args.batch}/rank; {args.transform} s = {args.sparsity:g} "
          f"({result['parameters'] / 1e6:.1f} M parameters); each rank holds "
          f"{sum(a for a, _ in result['shards'])}/{sum(b for _, b in result['shards'])} mask entries\n")
    print(f"{'':<34}{'median s':>10}{'steps':>7}{'x plain':>9}")
    print(f"{'plain (no masks, no engine)':<34}{plain:>10.3f}{len(times['plain']):>7}{1.0:>9.3f}")
    print(f"{'sift: masked, RigL (no update)':<34}{sift_step:>10.3f}{len(times['sift']):>7}{sift_step / plain:>9.3f}")
    print(f"{'  of which engine.step()':<34}{median(times['engine']):>10.3f}{len(times['engine']):>7}"
          f"{median(times['engine']) / plain:>9.3f}")
    print(f"{'sift: RigL update step':<34}{update:>10.3f}{len(times['update']):>7}{update / plain:>9.3f}")
    print(f"\nRigL update overhead, one update per 100 steps: {amortised:.2%} of training time "
          f"(every {args.update_interval} steps: {(update - sift_step) / (args.update_interval * sift_step):.2%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
