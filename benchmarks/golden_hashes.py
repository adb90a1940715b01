"""Bit-identical behaviour across refactors: hashes of every compiled weight and mask for a fixed seed.

    python benchmarks/golden_hashes.py --write benchmarks/golden_hashes.json   # before a refactor
    python benchmarks/golden_hashes.py --check benchmarks/golden_hashes.json   # after: exit 1 on any change

Compiles resnet18 (64x64 input) and a tiny GPT-2 with "none" and the four transforms at s = 0.75,
seed 0, and hashes the native module's state dict (weights, buffers, masks: name, dtype, shape and
bytes) and the graph form's, so a refactor that changes one bit of one tensor is caught.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import warnings

import torch

import sift_compiler as sift
from sift_compiler.capture.sources import load_model

MODELS = {
    "resnet18": ("torchvision:resnet18", (1, 3, 64, 64)),
    "gpt2": ("transformers:gpt2,n_layer=2,n_embd=64,n_head=4,vocab_size=500,n_positions=64", (1, 16)),
}
TRANSFORMS = ("none", "parallel", "factorized", "doped", "wide")


def state_hash(module: torch.nn.Module) -> str:
    """One sha256 over every tensor of the state dict, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def hashes() -> dict:
    out = {}
    for model_name, (spec, shape) in MODELS.items():
        for transform in TRANSFORMS:
            torch.manual_seed(0)
            source = load_model(spec, input_shape=shape)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = sift.compile(source.module, transform, 0.75, source.args, source.kwargs, seed=0)
            out[f"{model_name}/{transform}"] = {"output": result.output, "module": state_hash(result.module),
                                                "graph": state_hash(result.graph_module)}
            print(model_name, transform, out[f"{model_name}/{transform}"], flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", metavar="JSON")
    group.add_argument("--check", metavar="JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    now = hashes()
    if args.write:
        with open(args.write, "w") as f:
            json.dump(now, f, indent=1, sort_keys=True)
        return 0
    with open(args.check) as f:
        golden = json.load(f)
    changed = sorted(k for k in golden.keys() | now.keys() if golden.get(k) != now.get(k))
    print("bit-identical" if not changed else f"CHANGED: {changed}")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
