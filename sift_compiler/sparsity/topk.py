"""Exact, deterministic top-k of a layer's scores, whole or sharded over ranks.

RigL and SET keep the k active weights of largest magnitude and grow the k positions of largest
score. Which k is a total order, the same in a single process and on any number of FSDP ranks:

    score descending, then global flat (row-major) index ascending

so of two positions with equal scores the one with the lower index wins. ``-0.0`` equals
``0.0``; NaN ranks below every number (it is never chosen while a number is left).

How (`select_top`): scores map to int32 keys with the same order (the float's bits, negative
ones flipped). A radix search finds the key T of the k-th largest score in three rounds of 11,
11 and 10 bits: each round histograms the remaining candidates' next digits (one all-gather of
2048 counts per round on a sharded layer, nothing in a single process), picks the digit that
holds the k-th score and keeps only the candidates with it. Everything above T is selected; of
the positions equal to T, the first ``k - #above`` in global index order are, which needs only
each rank's count of equal positions (the last round's histogram, gathered per rank) because
FSDP2's shards are contiguous ranges of the flat order, rank by rank. Cost: about four passes
over the layer plus a few passes over a shrinking candidate set, faster than ``torch.topk``
on CPU for large k, and six small all-gathers per layer and update on a sharded run.
"""
from __future__ import annotations

from typing import Optional

import torch

from .shards import ShardSpec, gather_rows

_ROUNDS = ((21, 11), (10, 11), (0, 10))   # (shift, bits) of the key's digits, most significant first
_NAN_KEY = -(2 ** 31)                      # below the key of -inf


def order_keys(scores: torch.Tensor) -> torch.Tensor:
    """int32 keys ordered like the float scores (flattened), -0.0 as 0.0, NaN lowest."""
    x = scores.reshape(-1).to(torch.float32) + 0.0  # -0.0 + 0.0 == +0.0
    bits = x.view(torch.int32)
    keys = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip all but the sign bit (reverse their order)
    return keys.masked_fill_(torch.isnan(x), _NAN_KEY)


def select_top(scores: torch.Tensor, k: int, shard: Optional[ShardSpec] = None) -> torch.Tensor:
    """Bool mask (``scores``' shape) of the ``k`` best positions of the whole tensor: score
    descending, then global flat index ascending.

    ``scores`` is this rank's shard when ``shard`` is given (every rank of the shard group must
    call with the same ``k``); ``k`` counts over the whole tensor.
    """
    total = scores.numel() if shard is None else _numel(shard.shape)
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= total:
        return torch.ones_like(scores, dtype=torch.bool)
    keys = order_keys(scores)
    threshold, above, equal_per_rank = _kth_key(keys, k, shard)
    chosen = keys > threshold
    rank = 0 if shard is None else shard.rank
    take = min(max(k - above - int(equal_per_rank[:rank].sum()), 0), int(equal_per_rank[rank]))
    if take:
        chosen[torch.nonzero(keys == threshold).flatten()[:take]] = True
    return chosen.view(scores.shape)


def _kth_key(keys: torch.Tensor, k: int, shard: Optional[ShardSpec]):
    """(T, #keys > T over all ranks, per-rank #keys == T) where T is the k-th largest key."""
    candidates, prefix, above = keys, 0, 0
    per_rank = None
    for shift, bits in _ROUNDS:
        if shift + bits == 32:  # the sign-carrying top digit, moved to 0 .. 2^bits - 1
            digits = (candidates >> shift) + (1 << (bits - 1))
        else:
            digits = (candidates >> shift) & ((1 << bits) - 1)
        hist = torch.bincount(digits, minlength=1 << bits)
        per_rank = gather_rows(hist, shard)                               # (world, 2^bits)
        counts = per_rank.sum(0)
        from_top = counts.flip(0).cumsum(0)                               # keys in this digit or above
        i = int(torch.searchsorted(from_top, torch.tensor(k - above, device=from_top.device)))
        digit = (1 << bits) - 1 - i
        above += int(from_top[i]) - int(counts[digit])
        per_rank = per_rank[:, digit]
        candidates = candidates[digits == digit]
        prefix = prefix * (1 << bits) + digit
    threshold = prefix - (1 << 31)  # undo the top digit's offset: the key itself (a signed int32)
    return threshold, above, per_rank.cpu()


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
