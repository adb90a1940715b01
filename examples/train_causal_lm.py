"""Train a small causal LM with the Hugging Face Trainer: dense against Sparse Wide + RigL at equal FLOPs.

    python examples/train_causal_lm.py                      # defaults: a few minutes on 2 CPU cores
    python examples/train_causal_lm.py --steps 2000 --hidden 256 --layers 6 --out runs/lm

The model is a Llama built from its config (random initialisation, nothing downloaded); the
corpus is Python's own standard library source on this machine, read as bytes (vocabulary 256),
split by file into training and validation text. Both models train with the same Trainer
settings; the sparse one is ``sift.compile(model, "wide", 0.75)`` (hidden size x2, every weight
layer but the embedding and the LM head 75%+ sparse) with ``SparsityCallback("rigl")``, and stays a
``LlamaForCausalLM``: the Trainer computes its loss from ``labels``. The run prints validation
perplexity, weight-layer FLOPs per token, and the sparsity of every layer, and saves both models
with ``save_pretrained`` under ``--out`` (``sift.load(OUT/wide-rigl)`` brings the sparse one back).
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import sysconfig
import time
from typing import List, Tuple

import torch

import sift_compiler as sift


def stdlib_bytes(limit: int) -> Tuple[bytes, bytes]:
    """About ``limit`` bytes of the standard library's .py files (sorted, so always the same text),
    every tenth file held out for validation."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    train, valid, size = [], [], 0
    for i, path in enumerate(files):
        with open(path, "rb") as f:
            text = f.read()
        (valid if i % 10 == 9 else train).append(text)
        size += len(text)
        if size >= limit:
            break
    return b"\n".join(train), b"\n".join(valid)


class Chunks(torch.utils.data.Dataset):
    """Consecutive windows of ``length`` bytes; the model predicts each next byte."""

    def __init__(self, data: bytes, length: int) -> None:
        tokens = torch.tensor(list(data), dtype=torch.long)
        count = len(tokens) // length
        self.windows = tokens[:count * length].view(count, length)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int):
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


def build_model(args: argparse.Namespace):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3) // 8 * 8,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=args.length,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(config)


def train(name: str, model, callbacks: List, train_set, valid_set, args: argparse.Namespace) -> float:
    from transformers import Trainer, TrainingArguments
    settings = TrainingArguments(
        output_dir=os.path.join(args.out, name), max_steps=args.steps, per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=args.batch, learning_rate=args.lr, lr_scheduler_type="cosine",
        warmup_steps=args.steps // 20, weight_decay=0.1, max_grad_norm=1.0, logging_steps=max(1, args.steps // 10),
        save_strategy="no", report_to=[], use_cpu=True, seed=args.seed, dataloader_num_workers=0,
        disable_tqdm=not args.progress)
    trainer = Trainer(model=model, args=settings, train_dataset=train_set, eval_dataset=valid_set, callbacks=callbacks)
    start = time.perf_counter()
    trainer.train()
    loss = trainer.evaluate()["eval_loss"]
    print(f"{name}: {time.perf_counter() - start:.0f} s, validation loss {loss:.4f} (perplexity {math.exp(loss):.3f})",
          flush=True)
    model.save_pretrained(os.path.join(args.out, name))
    return math.exp(loss)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per model (default 300)")
    p.add_argument("--hidden", type=int, default=128, help="dense hidden size (default 128)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--length", type=int, default=128, help="bytes per training sequence")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--sparsity", type=float, default=0.75)
    p.add_argument("--update-interval", type=int, default=None,
                   help="RigL mask update interval (default: the paper's 100, or steps/10 for shorter runs)")
    p.add_argument("--corpus-bytes", type=int, default=4_000_000, help="bytes of stdlib source to read")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="lm-out", help="where both models are saved (save_pretrained)")
    p.add_argument("--progress", action="store_true", help="the Trainer's progress bars")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    train_text, valid_text = stdlib_bytes(args.corpus_bytes)
    train_set, valid_set = Chunks(train_text, args.length), Chunks(valid_text, args.length)
    print(f"corpus: {len(train_text) / 1e6:.1f} MB training, {len(valid_text) / 1e6:.1f} MB validation of "
          f"Python stdlib source; {len(train_set)} training sequences of {args.length} bytes", flush=True)
    example = {"input_ids": train_set[0]["input_ids"][None]}

    dense_model = build_model(args)
    dense = sift.compile(dense_model, "none", 0.0, (), example)       # its FLOP report
    sparse = sift.compile(build_model(args), "wide", args.sparsity, (), example, seed=args.seed)
    print(f"sparse model: {type(sparse.module).__name__} ({sparse.output}), hidden "
          f"{sparse.module.model.embed_tokens.embedding_dim}, s' = {sparse.report.effective_sparsity:.4f}", flush=True)

    from sift_compiler.integrations.transformers import SparsityCallback
    results = {"dense": train("dense", dense_model, [], train_set, valid_set, args)}
    interval = args.update_interval or min(100, max(1, args.steps // 10))
    results["wide-rigl"] = train("wide-rigl", sparse.module, [SparsityCallback("rigl", update_interval=interval)],
                                 train_set, valid_set, args)

    per_token = {"dense": dense.report.sift_flops / args.length, "wide-rigl": sparse.report.sift_flops / args.length}
    attention = {"dense": dense.report.categories["sift"]["attention"] / args.length,
                 "wide-rigl": sparse.report.categories["sift"]["attention"] / args.length}
    print(f"\n{'model':<10} {'valid ppl':>10} {'weight MFLOPs/token':>20} {'attention MFLOPs/token':>23}")
    for name, ppl in results.items():
        print(f"{name:<10} {ppl:>10.3f} {per_token[name] / 1e6:>20.3f} {attention[name] / 1e6:>23.3f}")
    print(f"\nsparsity per layer of wide-rigl (s = {args.sparsity}):")
    for layer, mask in sift.sparsity.masks(sparse.module).items():
        print(f"  {layer:<48} {tuple(mask.shape)!s:<12} {1 - mask.float().mean().item():.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
