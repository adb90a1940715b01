"""What the mask engine costs per training step, and what RigL's updates cost over a run.

1. Step time of a compiled model with masks (masked forward ``W * M`` plus the engine's
   re-masking after every optimizer step) against the same architecture without masks (every
   masked layer replaced by its plain layer): target ratio <= 1.10.
2. The amortised cost of RigL updates at the default schedule (one every 100 steps until 75%
   of training): each update step runs a dense weight gradient, stashes it and re-draws the
   masks. Target <= 5% of training time.

Rounds alternate between the variants and medians are reported, to damp noise from other load.
On CPU the clock is this process's CPU time with one torch thread by default (other processes on
a shared machine then slow the run but barely move the numbers); on CUDA it is wall time.

    python benchmarks/train_overhead.py                                   # CIFAR ResNet-18, s = 0.75
    python benchmarks/train_overhead.py --transform wide --sparsity 0.9 --batch-size 128 --device cuda
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import sift_compiler as sift
from sift_compiler.exporters import bake_masks
from sift_compiler.sparsity import iter_masked


def build(spec: str, classes: int) -> nn.Module:
    if spec == "cifar-resnet18":
        import torchvision
        model = torchvision.models.resnet18(num_classes=classes)
        model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
        return model
    return sift.load_model(spec).module


class Trainer:
    """One model, its optimizer, optionally a mask engine; ``step()`` times one training step."""

    def __init__(self, module: nn.Module, engine_factory: Optional[Callable], data, device,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.module = module.to(device).train()
        self.opt = torch.optim.SGD(self.module.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
        self.engine = engine_factory(self.module, self.opt) if engine_factory else None
        self.data, self.device, self.i, self.clock = data, device, 0, clock

    def step(self) -> float:
        x, y = self.data[self.i % len(self.data)]
        self.i += 1
        _sync(self.device)
        start = self.clock()
        F.cross_entropy(self.module(x), y).backward()
        self.opt.step()
        updated = self.engine.step() if self.engine else False
        self.opt.zero_grad(set_to_none=True)
        _sync(self.device)
        self.last_updated = updated
        return self.clock() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="cifar-resnet18", help="cifar-resnet18 or a model source (torchvision:NAME)")
    p.add_argument("--transform", default="parallel", help="parallel, factorized, doped or wide")
    p.add_argument("--sparsity", type=float, default=0.75)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--steps", type=int, default=4, help="steps per variant per round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--updates", type=int, default=5, help="RigL update steps to time")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--clock", choices=["auto", "cpu", "wall"], default="auto",
                   help="auto: process CPU time on CPU with one thread, wall time otherwise")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    use_cpu_clock = args.clock == "cpu" or (args.clock == "auto" and device.type == "cpu" and args.threads == 1)
    clock = time.process_time if use_cpu_clock else time.perf_counter
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    result = sift.compile(build(args.model, args.classes), args.transform, args.sparsity, (x[:1],))
    data = [(torch.randn_like(x).to(device), torch.randint(0, args.classes, (args.batch_size,)).to(device))
            for _ in range(4)]
    never = 10 ** 9  # RigL with no update in sight: every step is a normal step
    masked = Trainer(copy.deepcopy(result.module),
                     lambda m, o: sift.sparsity.RigL(m, o, total_steps=never, update_interval=never // 2), data, device,
                     clock)
    plain = Trainer(bake_masks(result.module), None, data, device, clock)
    for trainer in (masked, plain):  # warm-up
        for _ in range(3):
            trainer.step()
    times = {"masked": [], "plain": []}
    for _ in tqdm(range(args.rounds), desc="rounds"):
        for name, trainer in (("masked", masked), ("plain", plain)):
            times[name].append(sum(trainer.step() for _ in range(args.steps)) / args.steps)
    t_masked, t_plain = statistics.median(times["masked"]), statistics.median(times["plain"])

    interval = 4  # time several updates quickly; cost per update does not depend on the interval
    rigl = Trainer(copy.deepcopy(result.module),
                   lambda m, o: sift.sparsity.RigL(m, o, total_steps=never, update_interval=interval), data, device,
                   clock)
    update_times: List[float] = []
    normal_times: List[float] = []
    with tqdm(total=args.updates, desc="RigL updates") as bar:
        while len(update_times) < args.updates:
            t = rigl.step()
            (update_times if rigl.last_updated else normal_times).append(t)
            bar.update(int(rigl.last_updated))
    t_update, t_normal = statistics.median(update_times), statistics.median(normal_times[1:] or normal_times)
    extra = max(t_update - t_normal, 0.0)
    during = extra / (100 * t_normal)
    overall = 0.75 * extra / (100 * t_normal)

    masked_layers = sum(1 for _, layer in iter_masked(result.module) if layer.target_density < 1)
    rows = [("model", f"{args.model}, {args.transform} s={args.sparsity} ({masked_layers} sparse layers), "
                      f"batch {args.batch_size} x {args.image_size}^2, {device.type}, {torch.get_num_threads()} threads, "
                      f"{'CPU' if use_cpu_clock else 'wall'} time"),
            ("step, plain layers", f"{1000 * t_plain:.1f} ms"),
            ("step, masks + engine", f"{1000 * t_masked:.1f} ms"),
            ("ratio (target <= 1.10)", f"{t_masked / t_plain:.3f}"),
            ("RigL update step", f"{1000 * t_update:.1f} ms (normal step {1000 * t_normal:.1f} ms, "
                                 f"extra {1000 * extra:.1f} ms)"),
            ("update cost, every 100 steps", f"{100 * during:.2f}% while updates run, {100 * overall:.2f}% over the "
                                             f"whole run (target <= 5%)")]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
