"""Masked weights sharded by FSDP2: where this rank's shard lies, and the few collectives the engine needs.

`torch.distributed.fsdp.fully_shard` turns every parameter, the bool ``weight_mask`` included,
into a DTensor sharded on dim 0 (``Shard(0)``): with R rows on W ranks, rank r holds rows
``[r * c, min((r + 1) * c, R))``, c = ceil(R / W). So each rank holds a *contiguous range of the
flat (row-major) order*, ranks in order, and the weight, its mask, its gradient and its
optimizer state are sharded alike. The engine works on these local shards (``local(t)``) and
uses a collective only where a decision needs the whole layer:

    exact counts           all-reduce of per-layer counts (one per check, all layers together)
    RigL / SET drop, grow  `topk.select_top`: a radix search for the k-th score, three small
                           all-gathers of histograms per selection, ties broken by global index
    N:M                    nothing: shard boundaries must fall on M-row multiples (checked)

HSDP meshes (``Replicate`` on the replica dim, ``Shard(0)`` on the shard dim) work the same way:
collectives run over the shard dim's group; replicas hold identical shards.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..errors import UserInputError

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = Replicate = Shard = None


@dataclass(frozen=True)
class ShardSpec:
    """Where this rank's rows of one (R, ...) tensor lie, and the group that holds the others."""

    group: object              # the ProcessGroup of the shard mesh dim
    rank: int                  # this rank's index in ``group``
    world: int                 # ranks in ``group``
    row_offset: int            # first global row held here
    rows: int                  # rows held here (may be fewer on the last ranks, or 0)
    shape: Tuple[int, ...]     # the global shape

    @property
    def row_numel(self) -> int:
        numel = 1
        for d in self.shape[1:]:
            numel *= d
        return numel

    @property
    def flat_offset(self) -> int:
        """Global flat index of this shard's first element."""
        return self.row_offset * self.row_numel


def is_dtensor(t: object) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (its own storage: in-place edits change the parameter); t otherwise."""
    return t.to_local() if is_dtensor(t) else t


def shard_spec(t: torch.Tensor, name: str) -> Optional[ShardSpec]:
    """The `ShardSpec` of a DTensor sharded on dim 0 (FSDP2, HSDP), None for a plain or replicated tensor."""
    if not is_dtensor(t):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    mesh, placements = t.device_mesh, tuple(t.placements)
    shard_dims = [i for i, p in enumerate(placements) if isinstance(p, Shard)]
    others = [p for p in placements if not isinstance(p, (Shard, Replicate))]
    if others or len(shard_dims) > 1 or any(placements[i].dim != 0 for i in shard_dims):
        raise UserInputError(f"{name!r} is a DTensor with placements {placements}: the mask engine supports "
                             f"FSDP2/HSDP sharding (Shard(0) on one mesh dim, Replicate on the others), not "
                             f"tensor parallelism; shard it with torch.distributed.fsdp.fully_shard")
    if not shard_dims:
        return None  # replicated everywhere: the local tensor is the whole tensor
    local_shape, offset = compute_local_shape_and_global_offset(t.shape, mesh, placements)
    dim = shard_dims[0]
    return ShardSpec(group=mesh.get_group(dim), rank=mesh.get_local_rank(dim), world=mesh.size(dim),
                     row_offset=int(offset[0]), rows=int(local_shape[0]), shape=tuple(t.shape))


def gather_rows(t: torch.Tensor, spec: Optional[ShardSpec]) -> torch.Tensor:
    """(world, *t.shape): ``t`` of every rank of the shard group (t[None] without one); same shape on all ranks."""
    if spec is None or spec.world == 1:
        return t[None]
    out = torch.empty((spec.world * t.numel(),), dtype=t.dtype, device=t.device)
    dist.all_gather_into_tensor(out, t.contiguous().view(-1), group=spec.group)
    return out.view(spec.world, *t.shape)


def global_sums(rows: Sequence[Tuple[Optional[ShardSpec], Sequence[int]]]) -> List[List[int]]:
    """Sum each row of integers over its shard group; one all-reduce per distinct group.

    ``rows``: (spec, local counts) per layer, in the same order on every rank. Rows without a
    spec (unsharded layers) come back unchanged.
    """
    out = [list(map(int, values)) for _, values in rows]
    by_group: Dict[int, List[int]] = {}
    for i, (spec, _) in enumerate(rows):
        if spec is not None and spec.world > 1:
            by_group.setdefault(id(spec.group), []).append(i)
    if not by_group:
        return out
    for members in by_group.values():
        spec = rows[members[0]][0]
        width = max(len(out[i]) for i in members)
        flat = torch.zeros(len(members), width, dtype=torch.int64)
        for j, i in enumerate(members):
            flat[j, :len(out[i])] = torch.tensor(out[i], dtype=torch.int64)
        flat = flat.to(_collective_device(spec))
        dist.all_reduce(flat, group=spec.group)
        for j, i in enumerate(members):
            out[i] = flat[j, :len(out[i])].tolist()
    return out


def _collective_device(spec: ShardSpec) -> torch.device:
    """Gloo reduces CPU tensors, NCCL CUDA ones: the device the group's backend wants."""
    backend = str(dist.get_backend(spec.group)).lower()
    return torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")


def local_rows(full: torch.Tensor, spec: Optional[ShardSpec]) -> torch.Tensor:
    """This rank's rows of a full-size tensor (the whole tensor without a spec)."""
    return full if spec is None else full.narrow(0, spec.row_offset, spec.rows)
