"""Train an image classifier dense or with any Sparse-IFT transform, with the paper's recipe.

    python examples/train_image_classifier.py --data ~/data/cifar-100-python --transform wide \\
        --sparsity 0.9 --method rigl --epochs 200 --out runs/sw90

Data: a CIFAR-format directory (CIFAR-10 ``data_batch_1..5`` + ``test_batch`` or CIFAR-100
``train`` + ``test`` pickles) or an ImageFolder root with ``train/`` and ``val/`` (or ``test/``).
Nothing is downloaded. Recipe (reference implementation, CIFAR): SGD lr 0.1, momentum 0.9,
Nesterov, weight decay 5e-4, batch 128, cosine LR or steps x0.2 at 30/60/80% of training,
optional label smoothing; masks trained with static/SET/RigL (update every 100 steps until 75%,
drop fraction 0.3 cosine). A checkpoint is written atomically after every epoch
(``OUT/last.pt``: weights, optimizer, LR schedule, masks and RNG state; ``--resume OUT/last.pt``
continues from the last finished epoch, exactly with ``--workers 0``), and the run ends with a table of
accuracy and FLOPs per sample, also saved as ``OUT/summary.json``.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import pickle
import sys
import time
from typing import Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import sift_compiler as sift
from sift_compiler.io import atomic_path

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


# ------------------------------------------------------------------------------------------ data
class TensorImages(torch.utils.data.Dataset):
    """uint8 images (N, 3, H, W) with CIFAR augmentation (4-pixel padded crop, flip) when training."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, train: bool) -> None:
        self.images, self.labels, self.train = torch.from_numpy(images), torch.from_numpy(labels).long(), train
        self.mean = torch.tensor(CIFAR_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CIFAR_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.images[i].float().div_(255)
        if self.train:
            h, w = x.shape[1:]
            x = F.pad(x, (4, 4, 4, 4))
            top, left = np.random.randint(0, 9, size=2)
            x = x[:, top:top + h, left:left + w]
            if np.random.rand() < 0.5:
                x = x.flip(2)
        return (x - self.mean) / self.std, self.labels[i]


def _unpickle(path: str) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def cifar_split(root: str, train: bool) -> Tuple[np.ndarray, np.ndarray]:
    """Images and labels of a CIFAR-10/100 python-format directory."""
    names = (sorted(glob.glob(os.path.join(root, "data_batch_*"))) or [os.path.join(root, "train")]) if train \
        else [os.path.join(root, "test_batch") if os.path.exists(os.path.join(root, "test_batch"))
              else os.path.join(root, "test")]
    images, labels = [], []
    for name in names:
        batch = _unpickle(name)
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch.get(b"labels", batch.get(b"fine_labels")), dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def find_cifar(root: str) -> str:
    """``root`` or its CIFAR subdirectory (cifar-10-batches-py, cifar-100-python); '' if none."""
    for cand in [root] + sorted(glob.glob(os.path.join(root, "cifar-*"))):
        if any(os.path.isfile(os.path.join(cand, name)) for name in ("test_batch", "test")):
            return cand
    return ""


def datasets(root: str, image_size: int):
    """(train, test, num_classes, example input shape) for a CIFAR-format or ImageFolder directory."""
    cifar = find_cifar(root)
    if cifar:
        (xtr, ytr), (xte, yte) = cifar_split(cifar, True), cifar_split(cifar, False)
        classes = int(max(ytr.max(), yte.max())) + 1
        return TensorImages(xtr, ytr, True), TensorImages(xte, yte, False), classes, (1, 3, 32, 32)
    test_dir = next((os.path.join(root, d) for d in ("val", "test") if os.path.isdir(os.path.join(root, d))), None)
    if not os.path.isdir(os.path.join(root, "train")) or test_dir is None:
        raise sift.UserInputError(f"--data {root!r} is neither a CIFAR-format directory (data_batch_* + test_batch, "
                                  "or train + test pickles) nor an ImageFolder root with train/ and val/ (or test/)")
    from torchvision import datasets as tvd, transforms as T
    norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train = tvd.ImageFolder(os.path.join(root, "train"), T.Compose([
        T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm]))
    test = tvd.ImageFolder(test_dir, T.Compose([T.Resize(int(image_size * 8 / 7)), T.CenterCrop(image_size),
                                                T.ToTensor(), norm]))
    return train, test, len(train.classes), (1, 3, image_size, image_size)


# ----------------------------------------------------------------------------------------- model
def build_model(spec: str, num_classes: int) -> nn.Module:
    """``cifar-resnet18`` (3x3 stem, no max-pool, as in the paper's CIFAR runs) or any model source."""
    if spec == "cifar-resnet18":
        import torchvision
        model = torchvision.models.resnet18(num_classes=num_classes)
        model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
        return model
    family = spec.split(":", 1)[0]
    if family in ("torchvision", "timm") and "num_classes" not in spec:
        spec += f",num_classes={num_classes}"
    return sift.load_model(spec).module


def mask_engine(args, module: nn.Module, optimizer, total_steps: int):
    if args.transform == "none":
        return None
    nm = dict(pattern="nm", n=args.n, m=args.m) if args.nm else {}
    if args.method == "static":
        return sift.sparsity.Static(module, optimizer, **nm, seed=args.seed)
    cls = sift.sparsity.RigL if args.method == "rigl" else sift.sparsity.SET
    return cls(module, optimizer, total_steps, update_interval=args.update_interval, **nm, seed=args.seed)


def lr_schedule(args, optimizer, total_steps: int):
    if args.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_steps)
    milestones = [int(f * total_steps) for f in (0.3, 0.6, 0.8)]  # 60/120/160 of 200 epochs
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.2)


# -------------------------------------------------------------------------------------- training
@torch.no_grad()
def evaluate(model: nn.Module, loader, device) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x.to(device)).argmax(1) == y.to(device)).sum())
        total += len(y)
    return correct / max(total, 1)


def rng_state() -> dict:
    """Data order (torch RNG) and augmentation (numpy RNG) state, as plain data for weights_only loads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                      has_gauss, gauss]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def save_checkpoint(path: str, **state) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def run(args) -> dict:
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    device = torch.device(args.device)
    train_set, test_set, classes, shape = datasets(args.data, args.image_size)
    train_loader = torch.utils.data.DataLoader(train_set, args.batch_size, shuffle=True, num_workers=args.workers,
                                               drop_last=True)
    test_loader = torch.utils.data.DataLoader(test_set, 256, num_workers=args.workers)
    dense = build_model(args.model, classes)
    result = sift.compile(dense, args.transform, args.sparsity if args.transform != "none" else 0.0,
                          (torch.randn(shape),), seed=args.seed)
    model = result.module.to(device)
    steps_per_epoch = min(len(train_loader), args.max_steps_per_epoch or len(train_loader))
    total_steps = steps_per_epoch * args.epochs
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                                weight_decay=args.weight_decay)
    scheduler = lr_schedule(args, optimizer, total_steps)
    masks = mask_engine(args, model, optimizer, total_steps)
    start_epoch = 0
    if args.resume:
        state = torch.load(args.resume, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if masks is not None:
            masks.load_state_dict(state["masks"])
        start_epoch = state["epoch"]
        set_rng_state(state["rng"])
    os.makedirs(args.out, exist_ok=True)
    started = time.time()
    last_epoch = min(args.epochs, args.stop_after_epochs or args.epochs)
    for epoch in range(start_epoch, last_epoch):
        model.train()
        bar = tqdm(train_loader, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False,
                   disable=args.quiet)
        for step, (x, y) in enumerate(bar):
            if step == steps_per_epoch:
                break
            loss = F.cross_entropy(model(x.to(device)), y.to(device), label_smoothing=args.label_smoothing)
            loss.backward()
            optimizer.step()
            if masks is not None:
                masks.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.4f}")
        accuracy = evaluate(model, test_loader, device)
        if not args.quiet:
            print(f"epoch {epoch + 1}: test accuracy {accuracy:.4f}", file=sys.stderr)
        save_checkpoint(os.path.join(args.out, "last.pt"), model=model.state_dict(), optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict(), masks=masks.state_dict() if masks else None,
                        epoch=epoch + 1, args=vars(args), rng=rng_state())
    report = sift.flops(model, (torch.randn(shape, device=device),))
    summary = {"model": args.model, "transform": args.transform, "sparsity": args.sparsity,
               "method": args.method if masks is not None else "dense",
               "pattern": f"{args.n}:{args.m}-T" if args.nm else "unstructured",
               "test_accuracy": evaluate(model, test_loader, device), "epochs": args.epochs,
               "dense_mflops": result.report.dense_flops / 1e6, "sift_mflops": report.sift_flops / 1e6,
               "flop_ratio": report.sift_flops / result.report.dense_flops,
               "mask_updates": len(masks.history) if masks is not None else 0,
               "train_seconds": time.time() - started}
    with atomic_path(os.path.join(args.out, "summary.json")) as tmp:
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def table(summary: dict) -> str:
    rows = [("model", summary["model"]), ("transform", f"{summary['transform']} s={summary['sparsity']}"),
            ("masks", f"{summary['method']} {summary['pattern']} ({summary['mask_updates']} updates)"),
            ("test accuracy", f"{summary['test_accuracy']:.4f}"),
            ("weight MFLOPs / sample", f"{summary['sift_mflops']:.2f} (dense {summary['dense_mflops']:.2f}, "
                                       f"ratio {summary['flop_ratio']:.4f})"),
            ("training time", f"{summary['train_seconds']:.0f} s")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="CIFAR-format directory or ImageFolder root (train/ + val/)")
    p.add_argument("--model", default="cifar-resnet18", help="cifar-resnet18 or a model source, e.g. "
                   "torchvision:resnet18 (num_classes is added for torchvision/timm) or package.module:callable")
    p.add_argument("--transform", default="none", choices=["none", "parallel", "factorized", "doped", "wide"])
    p.add_argument("--sparsity", type=float, default=0.75)
    p.add_argument("--method", default="rigl", choices=["static", "set", "rigl"], help="mask training")
    p.add_argument("--nm", action="store_true", help="transposable N:M masks (with --n, --m)")
    p.add_argument("--n", type=int, default=2)
    p.add_argument("--m", type=int, default=8)
    p.add_argument("--update-interval", type=int, default=100, help="steps between mask updates")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--lr-schedule", default="step", choices=["cosine", "step"],
                   help="step: x0.2 at 30/60/80%% of training (the reference's CIFAR recipe)")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--image-size", type=int, default=224, help="ImageFolder crop size")
    p.add_argument("--max-steps-per-epoch", type=int, default=0, help="cut epochs short (smoke tests)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/train", help="directory for last.pt and summary.json")
    p.add_argument("--resume", default="", help="checkpoint to continue from (OUT/last.pt)")
    p.add_argument("--stop-after-epochs", type=int, default=0,
                   help="stop early after this many epochs (the schedule still spans --epochs; --resume finishes)")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        summary = run(args)
    except sift.SiftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
