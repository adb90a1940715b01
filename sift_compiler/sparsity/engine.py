"""The mask engine: keeps the masked layers of a compiled model exactly sparse while it trains.

::

    masks = RigL(result.module, optimizer, total_steps)    # or SET(...), Static(...)
    for x, y in loader:
        loss_fn(model(x), y).backward()
        optimizer.step()                  # engine's pre-step hook: stash dense grads, mask grads
        masks.step()                      # maybe drop/grow; mask weights, grads, optimizer state
        optimizer.zero_grad()

What happens at each step (reference implementation, spec "Sparse training"):

1. Before ``optimizer.step()`` (a step pre-hook on the optimizer): on steps that end with a mask
   update the layers ran in dense-gradient mode (see ``layers.py``): the dense gradient was
   summed into a side buffer by the backward (eager mode) or sits in ``weight.grad`` (compiled
   models); it is collected and ``weight.grad`` is masked, so the optimizer, and in eager mode
   gradient clipping too, sees exactly the sparse gradient on every step.
2. ``masks.step()``: on update steps, per layer, drop the ``alpha(t)`` fraction of active weights
   with the smallest magnitude and regrow as many (RigL: largest dense-gradient magnitude,
   SET: random); then multiply weights, gradients and every optimizer state tensor shaped like
   the weight (SGD momentum, Adam moments, ...) by the mask. Newly grown weights and their
   optimizer state are therefore zero. Every layer keeps its exact non-zero count.

Distributed (DDP): weights are identical on all ranks, SET draws from generators seeded by (seed,
layer, step), and RigL's dense gradients are averaged over the ranks with one all-reduce per mask
update (compiled models: they travel in ``weight.grad``, which DDP all-reduces anyway), so every
rank computes the same masks.

Sharded (FSDP2 ``fully_shard``: weights, masks, gradients and optimizer state are DTensors
sharded on dim 0): the engine works on each rank's shard (``shards.py``), counts and selections
are global (``topk.select_top``: the per-layer top-k over all shards, ties broken by global
index, exactly what a single process picks), and RigL's dense gradient travels in ``weight.grad``
through FSDP2's own reduce-scatter; the engine masks it right after the backward.
"""
from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import UserInputError
from .init import exact_count
from .layers import MaskedLayer, forget_float_masks, iter_masked, new_layer
from .nm import check_nm, is_transposable_nm, nm_shape_problem, parse_nm_pattern, random_nm_mask, regrow_nm
from .engine_state import EngineCheckpoint
from .schedules import UpdateSchedule
from .shards import ShardSpec, global_sums, is_dtensor, local, local_rows, shard_spec
from .topk import select_top

PATTERNS = ("unstructured", "nm")


@dataclass
class SparseWeight:
    """One masked weight the engine looks after."""

    name: str                 # parameter name in the unwrapped module, e.g. "layer1.0.conv1.weight"
    layer: MaskedLayer
    count: int                # exact number of active weights (over all shards), kept at every step
    shard: Optional[ShardSpec] = None   # where this rank's rows lie when FSDP2 shards the layer

    @property
    def param(self) -> nn.Parameter:
        return self.layer.weight

    @property
    def local_param(self) -> torch.Tensor:
        """This rank's shard of the weight (the weight itself when it is not sharded)."""
        return local(self.layer.weight)

    @property
    def local_mask(self) -> torch.Tensor:
        return local(self.layer.weight_mask)

    def keep_mask(self) -> torch.Tensor:
        """The (local) mask as 0/1 in the weight's dtype: re-masking with mul_ is ~10x faster than
        masked_fill_ on CPU. The layer caches it until the mask changes; a sharded layer converts
        it when needed (a cached copy would cost as much memory as the weight shard)."""
        if is_dtensor(self.layer.weight_mask):
            return self.local_mask.to(self.local_param.dtype)
        return self.layer.float_mask()

    @torch.no_grad()
    def install(self, mask: torch.Tensor) -> None:
        """Set the (local) mask and zero the weights it removes."""
        self.local_mask.copy_(mask)
        self.local_param.mul_(mask.to(self.local_param.dtype))


def unwrap(module: nn.Module) -> nn.Module:
    """The user's module inside DistributedDataParallel/DataParallel and torch.compile wrappers."""
    while True:
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            module = module._orig_mod
        else:
            return module


def name_seed(seed: int, name: str, step: int = 0) -> int:
    """A generator seed from (seed, parameter name, step): equal on every rank, independent of order."""
    return (seed * 1_000_003 + zlib.crc32(name.encode()) * 7919 + step) % (2 ** 63)


class MaskEngine(EngineCheckpoint):
    """Base of `Static`, `SET` and `RigL`: collects the sparse layers and keeps them exact.

    Subclasses say how to grow (`grow_scores`) and whether they need the dense gradient.
    """

    method = "static"
    needs_dense_grad = False

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, schedule: Optional[UpdateSchedule],
                 pattern: str = "unstructured", n: Optional[int] = None, m: Optional[int] = None,
                 seed: int = 0) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise UserInputError(f"{type(self).__name__} needs a torch.optim.Optimizer (it hooks optimizer.step), "
                                 f"got {type(optimizer).__name__}")
        if isinstance(pattern, str) and ":" in pattern:  # "2:4" is pattern="nm", n=2, m=4
            if (n, m) != (None, None):
                raise UserInputError(f"pattern={pattern!r} already gives n and m: do not pass n={n}, m={m} too")
            n, m = parse_nm_pattern(pattern)
            pattern = "nm"
        if pattern not in PATTERNS:
            raise UserInputError(f"unknown mask pattern {pattern!r}: choose 'unstructured', 'nm' (with n and m) or "
                                 "'N:M' such as '2:4'")
        self.module = unwrap(module)
        self.optimizer = optimizer
        self.schedule = schedule
        self.pattern = pattern
        self.n, self.m = check_nm(n, m) if pattern == "nm" else (None, None)
        self.seed = int(seed)
        self.step_count = 0
        self.update_due = False          # an update is owed (postponed when the optimizer skipped a step)
        self.postponed = 0
        self.optimizer_stepped = False   # the pre-step hook ran since the last step()
        self.dense_grads: Dict[str, torch.Tensor] = {}
        self._local_dense_grads: set = set()   # dense_grads that come from one rank's side buffer
        self._dense_mode = False
        self._masking_queued = False     # sharded layers: mask_gradients queued for the end of this backward
        self.history: List[Dict[str, Any]] = []   # one entry per mask update (step, drop fraction, counts)
        self.weights = self._collect()
        if pattern == "nm":
            self._make_nm()
        self._hook = optimizer.register_step_pre_hook(self._before_optimizer_step)
        self.apply_masks()
        self._set_dense_grad(self._wants_dense_grad(1))

    # ----------------------------------------------------------------------------------- set-up
    def _collect(self) -> List[SparseWeight]:
        in_optimizer = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        found = []
        for name, layer in sorted(iter_masked(self.module), key=lambda item: item[0]):
            density = layer.target_density
            pname = f"{name}.weight" if name else "weight"
            if not isinstance(density, (int, float)) or not 0 < density <= 1:
                raise UserInputError(f"masked weight {pname!r} has target density {density!r} (sparsity "
                                     f"{1 - density if isinstance(density, (int, float)) else '?'}): it must lie in "
                                     f"(0, 1]; sparsity must lie in [0, 1)")
            if density >= 1:
                continue  # a masked layer kept dense by its transform
            if id(layer.weight) not in in_optimizer:
                raise UserInputError(f"the optimizer does not train {pname!r}: build it from the compiled module's "
                                     f"parameters, e.g. torch.optim.SGD(result.module.parameters(), ...)")
            spec = shard_spec(layer.weight, pname)
            if is_dtensor(layer.weight) != is_dtensor(layer.weight_mask) or \
                    spec != shard_spec(layer.weight_mask, f"{pname}_mask"):
                raise UserInputError(f"{pname!r} and its mask are sharded differently: shard the module with "
                                     f"torch.distributed.fsdp.fully_shard, which shards the mask (a parameter) "
                                     f"with its weight")
            found.append(SparseWeight(pname, layer, exact_count(density, layer.weight.numel()), spec))
        if not found:
            raise UserInputError(
                f"{type(self).__name__}: the module has no sparse masked layers; compile it first, e.g. "
                f"sift_compiler.compile(model, transform='parallel', sparsity=0.75, example_inputs=(x,)).module")
        if any(w.shard is not None for w in found):
            forget_float_masks()  # a forward before the engine may have cached FSDP's unsharded masks
        if self.pattern == "unstructured":
            for w, actual in zip(found, self.global_counts(found)):
                if actual != w.count:
                    raise UserInputError(
                        f"{w.name!r} has {actual} active weights but its target density {w.layer.target_density:.4f} "
                        f"asks for exactly {w.count}; redraw masks with sift_compiler.sparsity.init_masks(module, "
                        f"only_fresh=False)")
        return found

    @staticmethod
    def global_counts(weights: List[SparseWeight]) -> List[int]:
        """Active weights per layer over all shards (one all-reduce when sharded; every rank must call)."""
        return [c[0] for c in global_sums([(w.shard, [int(w.local_mask.sum())]) for w in weights])]

    def _make_nm(self) -> None:
        """Give every sparse layer a transposable N:M mask (fresh weights where it newly opens)."""
        n, m = self.n, self.m
        density = n / m
        problems = [f"{w.name} {tuple(w.param.shape)}: {nm_shape_problem(tuple(w.param.shape), m)}"
                    for w in self.weights if nm_shape_problem(tuple(w.param.shape), m)]
        problems += [f"{w.name}: FSDP gives each of {w.shard.world} ranks {-(-w.param.shape[0] // w.shard.world)} of "
                     f"its {w.param.shape[0]} rows, not a multiple of m = {m}" for w in self.weights
                     if w.shard is not None and (-(-w.param.shape[0] // w.shard.world)) % m]
        if problems:
            raise UserInputError(f"{n}:{m}-T masks need weight matrices made of {m}x{m} blocks; these are not: "
                                 + "; ".join(problems) + f". Compile with round_to={m} (Sparse Wide) or widths "
                                 f"that are multiples of {m}")
        for w in self.weights:
            target = w.layer.target_density
            if abs(target - density) > 0.05 * target:
                raise UserInputError(
                    f"{n}:{m}-T gives density {density:g} (sparsity {1 - density:g}) but {w.name!r} was compiled for "
                    f"density {target:.4f}; compile with sparsity={1 - density:g} or choose n/m to match")
            if abs(target - density) > 0.005 * target:
                warnings.warn(f"{w.name}: density {target:.4f} -> {density:g} for {n}:{m}-T changes its FLOPs by "
                              f"{density / target - 1:+.1%}", stacklevel=3)
            w.layer.target_density = density
            w.count = exact_count(density, w.param.numel())
        # shards hold whole M-row blocks (checked above), so each rank checks its own; redraw where any fails
        invalid = global_sums([(w.shard, [int(not is_transposable_nm(w.local_mask, n, m))]) for w in self.weights])
        for w, (bad,) in zip(self.weights, invalid):
            if bad:
                self._redraw_nm(w)

    def _redraw_nm(self, w: SparseWeight) -> None:
        """A random N:M-T mask for the whole layer (each rank keeps its rows), fresh weights where it opens."""
        gen = torch.Generator().manual_seed(name_seed(self.seed, w.name))
        mask = local_rows(random_nm_mask(tuple(w.param.shape), self.n, self.m, gen), w.shard).to(w.local_param.device)
        opened = mask & ~w.local_mask
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(name_seed(self.seed, w.name, 1))  # same fresh weights on every rank
            fresh = local_rows(new_layer(w.layer).weight.detach(), w.shard)
        with torch.no_grad():
            w.local_param[opened] = fresh.to(w.local_param.device)[opened]
        w.install(mask)

    # ---------------------------------------------------------------------------- the training step
    def _wants_dense_grad(self, step: int) -> bool:
        return self.needs_dense_grad and self.schedule is not None and (
            self.update_due or self.schedule.is_update_step(step))

    def _set_dense_grad(self, on: bool) -> None:
        for w in self.weights:
            w.layer.dense_grad = on
            w.layer.engine_managed = True  # apply_masks has just made the weights zero off the mask
            if w.shard is not None:
                w.layer.sharded = True
                w.layer.__dict__["after_backward"] = self._queue_masking
        self._dense_mode = on

    def _queue_masking(self) -> None:
        """Sharded layers: mask the gradients once the whole backward is done, after FSDP2 has
        reduce-scattered them (its own end-of-backward callback is queued first), so gradient
        clipping sees the sparse gradient; on update steps the dense one is kept first."""
        if not self._masking_queued:
            self._masking_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._mask_after_backward)

    def _mask_after_backward(self) -> None:
        self._masking_queued = False
        if self._dense_mode:
            self.mask_gradients()
            return
        for w in self.weights:
            if w.shard is not None and w.param.grad is not None:
                local(w.param.grad).mul_(w.keep_mask())

    def _before_optimizer_step(self, optimizer, args, kwargs) -> None:
        self.optimizer_stepped = True
        self.mask_gradients()

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Collect the dense gradients (on steps that need them) and zero gradients at inactive positions.

        Runs by itself before ``optimizer.step()``. In eager mode the gradients are masked as
        backward computes them (the dense gradient goes to a side buffer, see ``layers.py``);
        torch.compile'd and traced models compute a dense ``weight.grad`` on update steps: call
        this yourself before anything that must see the sparse gradient, e.g. ``clip_grad_norm_``
        (with AMP: after ``scaler.unscale_``).
        """
        if not self._dense_mode:
            return  # gradients are already zero at inactive positions (forward uses W * M)
        for w in self.weights:
            side = w.layer.__dict__.pop("dense_grad_sum", None)
            if side is not None:  # eager: weight.grad is masked already
                self.dense_grads.setdefault(w.name, side)
                self._local_dense_grads.add(w.name)
                continue
            if w.param.grad is None:
                continue
            grad, keep = local(w.param.grad), w.local_mask
            stash = self.dense_grads.get(w.name)
            if stash is None:
                self.dense_grads[w.name] = grad.detach().clone()
            elif bool(grad.masked_fill(keep, 0).any()):
                # new dense gradient since the last call (a later micro-batch): the stash's inactive
                # part plus everything in weight.grad now; a call with nothing new (say after
                # clipping) keeps the stash as it was
                stash.masked_fill_(keep, 0).add_(grad)
            grad.masked_fill_(~keep, 0)

    def _reduce_dense_grads(self) -> None:
        """Average the side-buffer dense gradients over the ranks of a distributed run (one
        all-reduce per update): DDP only averages ``weight.grad``, which holds the masked gradient."""
        local = [self.dense_grads[name] for name in sorted(self._local_dense_grads) if name in self.dense_grads]
        if not local or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        flat = torch.cat([g.flatten() for g in local])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for g in local:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def step(self) -> bool:
        """Call once after every ``optimizer.step()``; returns True when the masks changed."""
        self.step_count += 1
        t = self.step_count
        if self.schedule is not None and self.schedule.is_update_step(t):
            self.update_due = True
        updated = False
        if self.update_due and self.optimizer_stepped:
            self._update(t)
            self.update_due, self.postponed, updated = False, 0, True
        elif self.update_due:
            self.postponed += 1  # e.g. GradScaler skipped optimizer.step(): no trustworthy gradient
            if self.postponed == 10:
                warnings.warn(f"{type(self).__name__}: the mask update due at step {t - 9} was postponed 10 times "
                              "because optimizer.step() did not run; is the optimizer given to the engine the "
                              "one that steps?", stacklevel=2)
        self.dense_grads.clear()
        self._local_dense_grads.clear()
        for w in self.weights:  # a skipped step (GradScaler) leaves a side buffer: never carry it over
            w.layer.__dict__.pop("dense_grad_sum", None)
        self._apply_masks(grads_finite=self.optimizer_stepped)
        self.optimizer_stepped = False
        self._set_dense_grad(self._wants_dense_grad(t + 1))
        return updated

    def apply_masks(self) -> None:
        """Zero weights, gradients and optimizer state at inactive positions (runs after every step)."""
        self._apply_masks(grads_finite=False)

    @torch.no_grad()
    def _apply_masks(self, grads_finite: bool) -> None:
        for w in self.weights:
            keep = w.keep_mask()
            w.local_param.mul_(keep)  # weights and state are finite where inactive: zero, kept zero by masked gradients
            if w.param.grad is not None:
                grad = local(w.param.grad)
                if grads_finite:
                    grad.mul_(keep)
                else:  # e.g. GradScaler skipped the step: inf/nan gradients, and nan * 0 = nan
                    grad.masked_fill_(~w.local_mask, 0)
            for value in self._state_like(w):
                value.mul_(keep if value.dtype == keep.dtype else keep.to(value.dtype))

    def _state_like(self, w: SparseWeight) -> List[torch.Tensor]:
        """The (local shards of the) optimizer state tensors shaped like the weight."""
        return [local(v) for v in self.optimizer.state.get(w.param, {}).values()
                if isinstance(v, torch.Tensor) and v.shape == w.param.shape]

    # ---------------------------------------------------------------------------------- updates
    def grow_scores(self, w: SparseWeight, step: int) -> Optional[torch.Tensor]:
        """Scores of the positions to grow (largest first); None skips the layer this update."""
        raise NotImplementedError

    @torch.no_grad()
    def _update(self, step: int) -> None:
        if self.needs_dense_grad:
            self._reduce_dense_grads()
        alpha = self.schedule.drop_fraction_at(step)
        # "replaced": weights taken out by magnitude and refilled by score (int(alpha * count) per layer);
        # "dropped"/"grown": net change, smaller when regrowth picks just-dropped positions.
        record = {"step": step, "drop_fraction": alpha, "replaced": 0, "dropped": 0, "grown": 0, "skipped": 0,
                  "nm_reverted": 0}
        counts = []  # per layer (shard, [dropped, grown, N:M blocks reverted]) on this rank
        for w in self.weights:
            n_drop = int(alpha * w.count)
            scores = self.grow_scores(w, step) if n_drop else None
            if scores is None:
                record["skipped"] += 1
                continue
            record["replaced"] += n_drop
            old = w.local_mask.clone()
            # keep the count - n_drop largest active magnitudes, then grow n_drop best scores among
            # the rest (just-dropped positions included): global over the shards, ties to the lower index
            kept = select_top(w.local_param.abs().masked_fill(~old, float("-inf")), w.count - n_drop, w.shard)
            reverted = 0
            if self.pattern == "nm":  # blocks lie within a shard: the refill is local
                new, reverted = regrow_nm(kept, scores, old, self.n, self.m)
            else:
                new = kept | select_top(scores.masked_fill(kept, float("-inf")), n_drop, w.shard)
            grown = new & ~old
            w.install(new)                        # zeroes the dropped weights
            w.local_param.masked_fill_(grown, 0)  # new connections start at zero (already zero: masked before)
            for value in self._state_like(w):
                value.masked_fill_(grown, 0)
            counts.append((w.shard, [int((old & ~new).sum()), int(grown.sum()), reverted]))
        for dropped, grown, reverted in global_sums(counts):
            record["dropped"] += dropped
            record["grown"] += grown
            record["nm_reverted"] += reverted
        self.history.append(record)

    # ------------------------------------------------------------------------------ inspection
    def masks(self) -> Dict[str, torch.Tensor]:
        """``{parameter name: bool mask}`` of the sparse weights."""
        return {w.name: w.layer.weight_mask for w in self.weights}

    def sparsity(self) -> float:
        """Fraction of zeros over all sparse weights, counted in the masks (sharded: on every rank, a collective)."""
        total = sum(w.param.numel() for w in self.weights)
        return 1.0 - sum(self.global_counts(self.weights)) / total

    def __repr__(self) -> str:
        pattern = f"{self.n}:{self.m}-T" if self.pattern == "nm" else self.pattern
        sched = (f", update every {self.schedule.update_interval} until step {self.schedule.end_step}, "
                 f"drop {self.schedule.drop_fraction}") if self.schedule else ""
        sparsity = 1.0 - sum(w.count for w in self.weights) / sum(w.param.numel() for w in self.weights)
        return (f"{type(self).__name__}({len(self.weights)} sparse weights, sparsity {sparsity:.4f}, "
                f"{pattern}, step {self.step_count}{sched})")

    def remove(self) -> None:
        """Detach from the optimizer and leave the layers computing with ``W * M`` again."""
        self._hook.remove()
        for w in self.weights:
            w.layer.dense_grad = w.layer.engine_managed = False
            w.layer.__dict__.pop("after_backward", None)
        self._dense_mode = False


class DynamicMaskEngine(MaskEngine):
    """Base of the engines that drop and regrow on the paper's schedule (RigL, SET): they differ
    only in where they grow (`grow_scores`)."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int,
                 update_interval: int = 100, drop_fraction: float = 0.3, end_fraction: float = 0.75,
                 pattern: str = "unstructured", *, n: Optional[int] = None, m: Optional[int] = None,
                 seed: int = 0) -> None:
        schedule = UpdateSchedule(total_steps, update_interval, drop_fraction, end_fraction)
        super().__init__(module, optimizer, schedule, pattern, n, m, seed)
