"""Mask initialisation: exact-count random masks, deterministic for a seed.

A layer at density d gets exactly ``round(d * numel)`` non-zeros (at least one), drawn uniformly
without replacement: no Bernoulli noise, so the FLOP report is exact. Each layer's generator is
seeded from the global seed and the layer's name, so a layer's mask does not depend on which
other layers exist or on the order they are visited.
"""
from __future__ import annotations

import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Optional, Tuple

import numpy as np

import torch
import torch.nn as nn

from ..errors import UserInputError
from .layers import MaskedLayer, iter_masked, remember_nnz
from .nm import nm_shape_problem, random_nm_mask


def exact_count(density: float, numel: int) -> int:
    """round(density * numel), clamped to [1, numel]."""
    return min(numel, max(1, int(round(density * numel))))


def layer_generator(seed: int, name: str, stream: int = 0) -> np.random.Generator:
    """A random stream of one layer (0: its mask, 1: its initial weights): a function of
    (seed, layer name, stream) only."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())] + ([stream] if stream else []))


def random_mask(shape, density: float, generator: np.random.Generator) -> torch.Tensor:
    """A bool mask of ``shape`` with exactly `exact_count` true entries at random positions."""
    numel = int(np.prod(shape))
    keep = exact_count(density, numel)
    # A Bernoulli draw (16-bit threshold: fast), then a uniformly chosen |excess| of the
    # over-represented side flipped: every position is treated alike, so every set of `keep`
    # positions is equally likely, at a fraction of the cost of sampling indices without replacement.
    threshold = round(keep / numel * 65536)
    mask = generator.integers(0, 65536, size=numel, dtype=np.uint16) < threshold if threshold < 65536 \
        else np.ones(numel, dtype=bool)
    excess = int(np.count_nonzero(mask)) - keep
    while excess:
        # rejection-sample distinct positions on the over-represented side, in draw order
        candidates = generator.integers(0, numel, size=2 * abs(excess) + 16)
        candidates = candidates[mask[candidates] == (excess > 0)]
        _, first = np.unique(candidates, return_index=True)
        chosen = candidates[np.sort(first)][:abs(excess)]
        mask[chosen] = excess < 0
        excess += -len(chosen) if excess > 0 else len(chosen)
    return torch.from_numpy(mask).view(tuple(shape))


def init_masks(module: nn.Module, seed: int = 0, only_fresh: bool = True,
               draw_weights: Optional[Callable[[MaskedLayer, str], None]] = None,
               nm: Optional[Tuple[int, int]] = None) -> Dict[str, int]:
    """Draw a mask for every masked layer below density 1; returns {layer name: non-zeros} of the
    layers it drew masks or weights for.

    ``only_fresh`` leaves layers that already carry a mask (not all ones) alone. Layers built
    under `deferred_init` then get their weights (`MaskedLayer.init_on_mask`, or
    ``draw_weights(layer, name)`` when given: the model's own init, `initialization.InitPolicy`),
    from a generator seeded by (seed, layer name): the same weights for the same seed, in any
    process. Each layer has its own streams, so without ``draw_weights`` (which may seed torch's
    global generator) layers are drawn on ``torch.get_num_threads()`` threads (NumPy draws without
    the GIL) with the same result as one after the other. ``nm=(N, M)`` draws random transposable
    N:M masks (`nm.random_nm_mask`) instead; every masked layer must then be at density N/M.
    """
    layers = sorted(iter_masked(module), key=lambda item: item[0])
    if nm is not None:
        _check_nm_layers(layers, *nm)
    total = sum(layer.weight.numel() for _, layer in layers)
    workers = min(torch.get_num_threads(), len(layers)) if total >= _THREADED_FROM and draw_weights is None else 1
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            drawn = list(pool.map(lambda item: _init_layer(*item, seed, only_fresh, draw_weights, nm), layers))
    else:
        drawn = [_init_layer(name, layer, seed, only_fresh, draw_weights, nm) for name, layer in layers]
    for (name, layer), count in zip(layers, drawn):
        if count is not None:
            remember_nnz(layer.weight_mask, count[1])
    return {name: count[0] for (name, _), count in zip(layers, drawn) if count is not None}


_THREADED_FROM = 1 << 20  # weights in all: below this, threads cost more than they save


def _check_nm_layers(layers, n: int, m: int) -> None:
    """Every sparse layer must be at density N/M and made of M x M blocks, or a UserInputError naming them."""
    problems = []
    for name, layer in layers:
        if layer.target_density >= 1.0:
            continue
        if abs(layer.target_density - n / m) > 1e-9:
            problems.append(f"{name}: density {layer.target_density:.4f}, not {n}/{m}")
        elif nm_shape_problem(tuple(layer.weight.shape), m):
            problems.append(f"{name} {tuple(layer.weight.shape)}: {nm_shape_problem(tuple(layer.weight.shape), m)}")
    if problems:
        raise UserInputError(f"{n}:{m} masks need every sparse layer at density {n}/{m} with both GEMM dimensions "
                             f"multiples of {m}; these are not: " + "; ".join(problems[:5])
                             + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
                             + f". Use transform='wide' (its widths round to {m}) or keep these layers dense "
                             "(keep_dense)")


def _init_layer(name: str, layer, seed: int, only_fresh: bool,
                draw_weights: Optional[Callable[[MaskedLayer, str], None]],
                nm: Optional[Tuple[int, int]] = None) -> Optional[Tuple[int, int]]:
    """Draw one layer's mask (and its weights if pending): (reported count, mask non-zeros), or None."""
    pending = layer.init_pending
    drawn = None
    if layer.target_density < 1.0 and (pending or not only_fresh or bool(layer.weight_mask.all())):
        generator = layer_generator(seed, name)
        if nm is None:
            mask = random_mask(tuple(layer.weight.shape), layer.target_density, generator)
        else:
            torch_generator = torch.Generator().manual_seed(int(generator.integers(2 ** 62)))
            mask = random_nm_mask(tuple(layer.weight.shape), nm[0], nm[1], torch_generator)
        if pending:  # the weights are drawn, and masked, below
            layer.install_mask(mask.to(layer.weight.device))
        else:
            layer.set_mask(mask.to(layer.weight.device))
        count = exact_count(layer.target_density, mask.numel()) if nm is None else int(mask.sum())
        drawn = (count, count)
    elif pending:  # a dense layer waiting for its weights: its mask is all ones
        layer.weight_mask.fill_(True)
    if pending:
        if draw_weights is not None:
            draw_weights(layer, name)
        else:
            layer.init_on_mask(layer_generator(seed, name, stream=1))
        drawn = drawn or (layer.weight.numel(), layer.weight_mask.numel())
    return drawn
