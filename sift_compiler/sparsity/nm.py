"""Transposable N:M masks (paper B.3.2): every M x M block has N non-zeros in each row and column.

A weight is viewed as the matrix of its GEMM, ``(out, in * kernel)``; the same mask is then N:M
along the rows (forward) and along the columns (the transposed GEMM of the backward pass).
4:8-T, 2:8-T and 1:8-T give 50%, 75% and 87.5% sparsity. Both matrix dimensions must be
multiples of M.

::

    2:4-T block     1 0 1 0      each row and each column holds exactly 2 of 4
                    0 1 0 1
                    1 0 0 1      -> mask.view(R/M, M, C/M, M): N per row and per column
                    0 1 1 0

RigL and SET keep the pattern through updates: the smallest weights of the layer are dropped,
then every block is refilled greedily, best score first, choosing only positions whose row and
column both still lack non-zeros. The greedy fill can corner itself in a block (the remaining
rows and columns with room only meet at kept positions); such a block keeps the mask it had
before the update, which is valid N:M-T, and the engine counts how often that happens.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..errors import UserInputError


def check_nm(n: object, m: object) -> Tuple[int, int]:
    """(n, m) as ints with 0 < n < m, or a UserInputError saying what is wrong."""
    for name, value in (("n", n), ("m", m)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserInputError(f"pattern='nm' needs integers n and m (e.g. n=2, m=8 for 2:8-T), got {name}={value!r}")
    if m < 2:
        raise UserInputError(f"N:M block size m must be at least 2, got m={m}")
    if n > m:
        raise UserInputError(f"N:M needs N <= M (N non-zeros in every M), got n={n} > m={m}")
    if n == m or n < 1:
        raise UserInputError(f"{n}:{m} means sparsity {1 - n / m:g}, outside (0, 1): choose 0 < n < m "
                             f"(4:8, 2:8 and 1:8 give 50%, 75% and 87.5%)")
    return n, m


def parse_nm_pattern(pattern: object) -> Optional[Tuple[int, int]]:
    """None for "unstructured", (N, M) for "N:M" (e.g. "2:4"); a UserInputError for anything else."""
    if pattern == "unstructured":
        return None
    parts = pattern.split(":") if isinstance(pattern, str) else []
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise UserInputError(f"unknown mask pattern {pattern!r}: choose 'unstructured' or 'N:M' such as '2:4'")
    return check_nm(int(parts[0]), int(parts[1]))


def matrix_shape(shape: Tuple[int, ...]) -> Tuple[int, int]:
    """The GEMM view of a weight: (out features/channels, everything else)."""
    cols = 1
    for d in shape[1:]:
        cols *= d
    return int(shape[0]), cols


def nm_shape_problem(shape: Tuple[int, ...], m: int) -> str:
    """Why a weight of ``shape`` cannot hold M x M blocks, or '' when it can."""
    rows, cols = matrix_shape(shape)
    bad = [f"{what} = {v}" for what, v in (("rows (out)", rows), ("columns (in x kernel)", cols)) if v % m]
    return f"{' and '.join(bad)} not a multiple of m = {m}" if bad else ""


def to_blocks(t: torch.Tensor, m: int) -> torch.Tensor:
    """(R, C)-viewable tensor -> (R/m * C/m, m, m) blocks (a copy)."""
    rows, cols = matrix_shape(tuple(t.shape))
    return t.reshape(rows // m, m, cols // m, m).permute(0, 2, 1, 3).reshape(-1, m, m)


def from_blocks(blocks: torch.Tensor, shape: Tuple[int, ...], m: int) -> torch.Tensor:
    """Inverse of `to_blocks`."""
    rows, cols = matrix_shape(shape)
    return blocks.reshape(rows // m, cols // m, m, m).permute(0, 2, 1, 3).reshape(shape)


def is_transposable_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """True when every M x M block of ``mask`` has exactly N non-zeros per row and per column."""
    if nm_shape_problem(tuple(mask.shape), m):
        return False
    blocks = to_blocks(mask.to(torch.int32), m)
    return bool((blocks.sum(-1) == n).all()) and bool((blocks.sum(-2) == n).all())


def random_nm_mask(shape: Tuple[int, ...], n: int, m: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly shuffled transposable N:M mask of ``shape``.

    Each block starts as N shifted diagonals (row i holds columns i + o mod M for N random
    offsets o, so rows and columns each hold N), then its rows and columns are permuted at random.
    """
    rows, cols = matrix_shape(shape)
    count = (rows // m) * (cols // m)
    offsets = torch.rand(count, m, generator=generator).argsort(1)[:, :n]                  # (B, n)
    idx = (torch.arange(m)[None, :, None] + offsets[:, None, :]) % m                        # (B, m, n)
    base = torch.zeros(count, m, m, dtype=torch.bool).scatter_(2, idx, True)
    row_perm = torch.rand(count, m, generator=generator).argsort(1)
    col_perm = torch.rand(count, m, generator=generator).argsort(1)
    shuffled = base.gather(1, row_perm[:, :, None].expand(count, m, m))
    shuffled = shuffled.gather(2, col_perm[:, None, :].expand(count, m, m))
    return from_blocks(shuffled, shape, m)


def regrow_nm(kept: torch.Tensor, scores: torch.Tensor, previous: torch.Tensor, n: int, m: int
              ) -> Tuple[torch.Tensor, int]:
    """Fill ``kept`` back to transposable N:M, best ``scores`` first; returns (mask, blocks reverted).

    ``kept`` must be a subset of ``previous`` (an N:M-T mask), so a completion always exists;
    blocks where the greedy fill gets stuck take ``previous``'s block instead.
    """
    shape = tuple(kept.shape)
    cur = to_blocks(kept, m)
    old = to_blocks(previous, m)
    score = to_blocks(scores.to(torch.float32), m).flatten(1)
    row_room = n - cur.sum(-1)                                      # (B, m) non-zeros still missing
    col_room = n - cur.sum(-2)
    grown = torch.zeros_like(cur)
    rounds = int(row_room.sum(-1).max()) if cur.numel() else 0
    for _ in range(rounds):
        if not _greedy_round(cur, grown, score, row_room, col_room, m):
            break
    for _ in range(rounds):  # corners: swap a grown position out to make room (a 3-edge augmenting path)
        if not _augment_round(cur, grown, score, row_room, col_room, m):
            break
    stuck = row_room.sum(-1) > 0
    cur[stuck] = old[stuck]
    return from_blocks(cur, shape, m), int(stuck.sum())


def _greedy_round(cur, grown, score, row_room, col_room, m: int) -> bool:
    """Add the best open position of every block that still has room; False when none could."""
    open_ = (~cur & (row_room > 0)[:, :, None] & (col_room > 0)[:, None, :]).flatten(1)
    take = open_.any(1)
    if not bool(take.any()):
        return False
    best = torch.where(open_, score, torch.full_like(score, float("-inf"))).argmax(1)[take]
    b = torch.nonzero(take).flatten()
    r, c = best // m, best % m
    cur[b, r, c] = True
    grown[b, r, c] = True
    row_room[b, r] -= 1
    col_room[b, c] -= 1
    return True


def _augment_round(cur, grown, score, row_room, col_room, m: int) -> bool:
    """In each block still short of non-zeros, with row i and column j both short but (i, j)
    taken: add (i, j'), move grown (k, j') to (k, j). Row i and column j gain one, others keep.
    Picks the (j', k) with the best score change; False when no block could be fixed this way."""
    short = torch.nonzero(row_room.sum(-1) > 0).flatten()
    if short.numel() == 0:
        return False
    i = row_room[short].gt(0).float().argmax(1)                     # first short row
    j = col_room[short].gt(0).float().argmax(1)                     # first short column
    free = ~cur[short]                                              # (S, m, m)
    s = score[short].view(-1, m, m)
    sel = torch.arange(short.numel(), device=cur.device)
    add_first = free[sel, i, :]                                     # (S, m) over j'
    move_from = grown[short]                                        # (S, k, j')
    add_second = free[sel, :, j]                                    # (S, m) over k
    ok = add_first[:, None, :] & move_from & add_second[:, :, None]  # (S, k, j')
    gain = s[sel, i, :][:, None, :] - s + s[sel, :, j][:, :, None]
    gain = torch.where(ok, gain, torch.full_like(gain, float("-inf"))).flatten(1)
    fixable = ok.flatten(1).any(1)
    if not bool(fixable.any()):
        return False
    best = gain.argmax(1)[fixable]
    b, i, j = short[fixable], i[fixable], j[fixable]
    k, jp = best // m, best % m
    cur[b, i, jp] = True
    grown[b, i, jp] = True
    cur[b, k, jp] = False
    grown[b, k, jp] = False
    cur[b, k, j] = True
    grown[b, k, j] = True
    row_room[b, i] -= 1
    col_room[b, j] -= 1
    return True
