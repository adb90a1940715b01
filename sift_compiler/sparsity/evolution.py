"""SET (Mocanu et al. 2018): drop the smallest weights, regrow at random positions.

The random scores of a layer come from a counter-based generator (NumPy's Philox) keyed by
(seed, parameter name, step), so every rank of a distributed run, and a run resumed from a
checkpoint, draws the same positions. Counter-based means a rank that holds only some rows of an
FSDP2-sharded layer jumps straight to its first element and draws only its own rows: the same
numbers at the same positions as a single process drawing the whole layer.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from .engine import DynamicMaskEngine, SparseWeight, name_seed
from .shards import ShardSpec

_FLOATS_PER_BLOCK = 8  # one Philox counter step: 4 x 64 random bits, 8 float32 draws of 32 bits each


class SET(DynamicMaskEngine):
    """Dynamic sparse training with random regrowth (Sparse Evolutionary Training).

    Same arguments and schedule as `RigL`; no dense gradient is needed.
    """

    method = "set"

    def grow_scores(self, w: SparseWeight, step: int) -> Optional[torch.Tensor]:
        scores = uniform_rows(name_seed(self.seed, w.name, step), tuple(w.param.shape), w.shard)
        return scores.to(w.local_param.device)


def uniform_rows(key: int, shape: Tuple[int, ...], shard: Optional[ShardSpec] = None) -> torch.Tensor:
    """U[0, 1) float32 scores of a tensor of ``shape`` from Philox(``key``), row-major; only this
    rank's rows when ``shard`` is given (the same values those positions get in the whole draw)."""
    rows = shape[0] if shard is None else shard.rows
    row_numel = int(np.prod(shape[1:], dtype=np.int64))
    offset = 0 if shard is None else shard.flat_offset
    bits = np.random.Philox(key=key)
    bits.advance(offset // _FLOATS_PER_BLOCK)
    gen = np.random.Generator(bits)
    if offset % _FLOATS_PER_BLOCK:
        gen.random(offset % _FLOATS_PER_BLOCK, dtype=np.float32)  # the rest of the block before this shard
    values = gen.random(rows * row_numel, dtype=np.float32)
    return torch.from_numpy(values).view(rows, *shape[1:])
