"""Checkpoint sizes: compact (values + bitmask) against the dense-masked file, every transform.

For each model and transform at each sparsity it compiles, writes the compact folder
(`sift.save_pretrained(result, dir, format="compact")`) and the dense-masked state dict (every
tensor as it is: weights with their zeros, bool masks), reads the compact folder back with
`sift.load` and checks that the outputs are equal; optionally N:M masks are installed first.
Sizes are the bytes of the safetensors files on disk.

    python benchmarks/checkpoint_sizes.py --json docs/results/checkpoint-sizes.json
    python benchmarks/checkpoint_sizes.py --models resnet18 --sparsities 0.9     # one row per transform
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from typing import Any, Dict, List

import torch

import sift_compiler as sift
from sift_compiler.capture.sources import load_model
from sift_compiler.errors import SiftWarning
from sift_compiler.sparsity.nm import random_nm_mask

MODELS = {
    "resnet18": ("torchvision:resnet18", (1, 3, 64, 64)),
    "llama-small": ("transformers:llama,num_hidden_layers=4,hidden_size=256,num_attention_heads=4,"
                    "num_key_value_heads=2,intermediate_size=688,vocab_size=4096,max_position_embeddings=256", (1, 32)),
}


def _folder_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory) if f.endswith(".safetensors"))


def _install_nm(result, n: int, m: int) -> None:
    generator = torch.Generator().manual_seed(0)
    for _, layer in sift.sparsity.iter_masked(result.module):
        mask = random_nm_mask(tuple(layer.weight.shape), n, m, generator)
        with torch.no_grad():
            layer.weight.mul_(mask)
        layer.install_mask(mask)


def measure(name: str, transform: str, sparsity: float, pattern: str, work: str) -> Dict[str, Any]:
    spec, shape = MODELS[name]
    source = load_model(spec, input_shape=shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SiftWarning)
        result = sift.compile(source.module, transform, sparsity, source.args, source.kwargs,
                              round_to=8 if pattern != "unstructured" else 1)
    if pattern != "unstructured":
        n, m = (int(v) for v in pattern.split(":"))
        _install_nm(result, n, m)
    folder = os.path.join(work, f"{name}-{transform}-{sparsity}-{pattern.replace(':', '-')}")
    result.save_pretrained(folder, format="compact")
    from safetensors.torch import save_file
    dense_path = folder + ".dense.safetensors"
    save_file({k: v.contiguous() for k, v in result.module.state_dict().items()}, dense_path)
    loaded = sift.load(folder, model=load_model(spec, input_shape=shape).module)
    with torch.no_grad():
        same = all(torch.equal(a, b) for a, b in zip(_tensors(loaded.module.eval()(*source.args, **source.kwargs)),
                                                      _tensors(result.module.eval()(*source.args, **source.kwargs))))
    masks = sift.sparsity.masks(result.module)
    kept = sum(int(m.sum()) for m in masks.values()) / max(1, sum(m.numel() for m in masks.values()))
    compact, dense = _folder_bytes(folder), os.path.getsize(dense_path)
    return {"model": name, "transform": transform, "sparsity": sparsity, "pattern": pattern,
            "mask_density": round(kept, 4), "compact_bytes": compact, "dense_masked_bytes": dense,
            "ratio": round(compact / dense, 4), "outputs_equal": same}


def _tensors(out) -> List[torch.Tensor]:
    import torch.utils._pytree as pytree
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--transforms", nargs="+", default=["wide", "parallel", "factorized", "doped"])
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.9])
    p.add_argument("--nm", nargs="*", default=["2:4"], help="N:M patterns, measured with Sparse Wide at s = 0.5")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name in args.models:
            for transform in args.transforms:
                for s in args.sparsities:
                    rows.append(measure(name, transform, s, "unstructured", work))
                    print(_line(rows[-1]), flush=True)
            for pattern in args.nm:
                rows.append(measure(name, "wide", 0.5, pattern, work))
                print(_line(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0 if all(r["outputs_equal"] for r in rows) else 1


def _line(r: Dict[str, Any]) -> str:
    return (f"{r['model']:12s} {r['transform']:10s} s={r['sparsity']:<4} {r['pattern']:12s} density {r['mask_density']:.3f}"
            f"  compact {r['compact_bytes'] / 1e6:8.2f} MB  dense-masked {r['dense_masked_bytes'] / 1e6:8.2f} MB"
            f"  ratio {r['ratio']:.3f}  outputs equal: {r['outputs_equal']}")


if __name__ == "__main__":
    sys.exit(main())
