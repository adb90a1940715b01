"""Independent checks of a compiled model, used by many tests."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

from sift_compiler.sparsity.layers import WEIGHT_LAYER_TYPES, MaskedLayer, iter_masked


def exit_status(main, argv) -> int:
    """The exit status a console script's ``main`` would give (argparse errors raise SystemExit)."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:
        return int(e.code)


def tensors(out):
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def independent_weight_flops(module: nn.Module, args, kwargs, by_mask: bool = False) -> float:
    """Weight-layer FLOPs per sample by torch's own FlopCounterMode (shape-based, dense), each masked
    layer scaled by the fraction of its effective weight that is non-zero (counted on the tensors;
    ``by_mask``: the fraction of its mask that is set)."""
    counter = FlopCounterMode(display=False)
    module.eval()
    with torch.no_grad(), counter:
        module(*args, **kwargs)
    counts = counter.get_flop_counts()
    root = type(module).__name__  # FlopCounterMode prefixes names with the root module's class name
    total = 0.0
    for name, layer in module.named_modules():
        if not isinstance(layer, WEIGHT_LAYER_TYPES):
            continue
        flops = sum(counts.get(f"{root}.{name}", {}).values())
        if isinstance(layer, MaskedLayer):  # count the zeros in the weights the layer computes with
            weight = layer.weight_mask if by_mask else layer.masked_weight()
            flops = flops * int(torch.count_nonzero(weight)) / weight.numel()
        total += flops  # dense layers count dense, even where a weight happens to be 0
    batch = tensors((args, kwargs))[0].shape[0]
    return total / batch


def assert_grads_only_unmasked(module: nn.Module) -> None:
    any_masked = False
    for name, layer in iter_masked(module):
        any_masked = True
        grad = layer.weight.grad
        assert grad is not None, f"{name}: no gradient"
        nonzero = grad != 0
        assert not bool((nonzero & ~layer.weight_mask).any()), f"{name}: gradient reaches masked weights"
        assert bool((nonzero & layer.weight_mask).any()), f"{name}: no gradient reaches unmasked weights"
    assert any_masked, "no masked layers"


def assert_allclose_outputs(actual, expected, rtol=1e-3, atol_scale=1e-4) -> None:
    for a, e in zip(actual, expected):
        e = np.asarray(e)
        np.testing.assert_allclose(np.asarray(a), e, rtol=rtol, atol=atol_scale * max(1.0, float(np.abs(e).max())))


def run_script(script: str, *args: str, ranks: int = 1, timeout: int = 600) -> None:
    """Run a test file as a program (its ``__main__``) in a fresh process, or under torchrun with
    ``ranks`` gloo processes, one torch thread each and the repository on the path; fails the
    test with the end of its output if it exits non-zero."""
    env = dict(os.environ, OMP_NUM_THREADS="1", NM_DISABLE_ANALYTICS="1")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         env.get("PYTHONPATH", "")])
    prefix = [sys.executable] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    run = subprocess.run(prefix + [os.path.abspath(script), *args], env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
