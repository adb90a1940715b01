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
"""
from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from ..errors import UserInputError
from .init import exact_count
from .layers import MaskedLayer, iter_masked, new_layer
from .nm import check_nm, is_transposable_nm, nm_shape_problem, random_nm_mask, regrow_nm
from .schedules import UpdateSchedule

PATTERNS = ("unstructured", "nm")
STATE_VERSION = 1


@dataclass
class SparseWeight:
    """One masked weight the engine looks after."""

    name: str                 # parameter name in the unwrapped module, e.g. "layer1.0.conv1.weight"
    layer: MaskedLayer
    count: int                # exact number of active weights, kept at every step

    @property
    def param(self) -> nn.Parameter:
        return self.layer.weight

    def keep_mask(self) -> torch.Tensor:
        """The mask as 0/1 in the weight's dtype: re-masking with mul_ is ~10x faster than
        masked_fill_ on CPU. The layer caches it until the mask changes."""
        return self.layer.float_mask()


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


class MaskEngine:
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
        if pattern not in PATTERNS:
            raise UserInputError(f"unknown mask pattern {pattern!r}: choose 'unstructured' or 'nm' (with n and m)")
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
            count = exact_count(density, layer.weight.numel())
            if self.pattern == "unstructured" and int(layer.weight_mask.sum()) != count:
                raise UserInputError(
                    f"{pname!r} has {int(layer.weight_mask.sum())} active weights but its target density {density:.4f} "
                    f"asks for exactly {count}; redraw masks with sift_compiler.sparsity.init_masks(module, "
                    f"only_fresh=False)")
            found.append(SparseWeight(pname, layer, count))
        if not found:
            raise UserInputError(
                f"{type(self).__name__}: the module has no sparse masked layers; compile it first, e.g. "
                f"sift_compiler.compile(model, transform='parallel', sparsity=0.75, example_inputs=(x,)).module")
        return found

    def _make_nm(self) -> None:
        """Give every sparse layer a transposable N:M mask (fresh weights where it newly opens)."""
        n, m = self.n, self.m
        density = n / m
        problems = [f"{w.name} {tuple(w.param.shape)}: {nm_shape_problem(tuple(w.param.shape), m)}"
                    for w in self.weights if nm_shape_problem(tuple(w.param.shape), m)]
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
            if not is_transposable_nm(w.layer.weight_mask, n, m):
                self._redraw_nm(w)

    def _redraw_nm(self, w: SparseWeight) -> None:
        gen = torch.Generator().manual_seed(name_seed(self.seed, w.name))
        mask = random_nm_mask(tuple(w.param.shape), self.n, self.m, gen).to(w.param.device)
        opened = mask & ~w.layer.weight_mask
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(name_seed(self.seed, w.name, 1))  # same fresh weights on every rank
            fresh = new_layer(w.layer).weight.detach()
        with torch.no_grad():
            w.param[opened] = fresh.to(w.param.device)[opened]
        w.layer.set_mask(mask)

    # ---------------------------------------------------------------------------- the training step
    def _wants_dense_grad(self, step: int) -> bool:
        return self.needs_dense_grad and self.schedule is not None and (
            self.update_due or self.schedule.is_update_step(step))

    def _set_dense_grad(self, on: bool) -> None:
        for w in self.weights:
            w.layer.dense_grad = on
            w.layer.engine_managed = True  # apply_masks has just made the weights zero off the mask
        self._dense_mode = on

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
            grad = w.param.grad
            if grad is None:
                continue
            if w.name not in self.dense_grads:
                self.dense_grads[w.name] = grad.detach().clone()
            grad.masked_fill_(~w.layer.weight_mask, 0)

    def _reduce_dense_grads(self) -> None:
        """Average the side-buffer dense gradients over the ranks of a distributed run (one
        all-reduce per update): DDP only averages ``weight.grad``, which holds the masked gradient."""
        import torch.distributed as dist
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
            w.param.mul_(keep)  # weights and state are finite where inactive: zero, kept zero by masked gradients
            grad = w.param.grad
            if grad is not None:
                if grads_finite:
                    grad.mul_(keep)
                else:  # e.g. GradScaler skipped the step: inf/nan gradients, and nan * 0 = nan
                    grad.masked_fill_(~w.layer.weight_mask, 0)
            for value in self.optimizer.state.get(w.param, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == w.param.shape:
                    value.mul_(keep if value.dtype == keep.dtype else keep.to(value.dtype))

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
        for w in self.weights:
            n_drop = int(alpha * w.count)
            scores = self.grow_scores(w, step) if n_drop else None
            if scores is None:
                record["skipped"] += 1
                continue
            record["replaced"] += n_drop
            old = w.layer.weight_mask.clone()
            kept = _keep_largest(w.param.abs(), old, w.count - n_drop)
            if self.pattern == "nm":
                new, reverted = regrow_nm(kept, scores, old, self.n, self.m)
                record["nm_reverted"] += reverted
            else:
                new = _grow_best(kept, scores, w.count - int(kept.sum()))
            grown = new & ~old
            w.layer.set_mask(new)          # zeroes the dropped weights
            w.param.masked_fill_(grown, 0)  # new connections start at zero (already zero: masked before)
            for value in self.optimizer.state.get(w.param, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == w.param.shape:
                    value.masked_fill_(grown, 0)
            record["dropped"] += int((old & ~new).sum())
            record["grown"] += int(grown.sum())
        self.history.append(record)

    # ------------------------------------------------------------------------------ inspection
    def masks(self) -> Dict[str, torch.Tensor]:
        """``{parameter name: bool mask}`` of the sparse weights."""
        return {w.name: w.layer.weight_mask for w in self.weights}

    def sparsity(self) -> float:
        """Fraction of zeros over all sparse weights."""
        total = sum(w.param.numel() for w in self.weights)
        return 1.0 - sum(int(w.layer.weight_mask.sum()) for w in self.weights) / total

    def __repr__(self) -> str:
        pattern = f"{self.n}:{self.m}-T" if self.pattern == "nm" else self.pattern
        sched = (f", update every {self.schedule.update_interval} until step {self.schedule.end_step}, "
                 f"drop {self.schedule.drop_fraction}") if self.schedule else ""
        return (f"{type(self).__name__}({len(self.weights)} sparse weights, sparsity {self.sparsity():.4f}, "
                f"{pattern}, step {self.step_count}{sched})")

    # ----------------------------------------------------------------------------- checkpoints
    def _config(self) -> Dict[str, Any]:
        sched = self.schedule
        return {"method": self.method, "pattern": self.pattern, "n": self.n, "m": self.m, "seed": self.seed,
                "total_steps": sched.total_steps if sched else None,
                "update_interval": sched.update_interval if sched else None,
                "drop_fraction": sched.drop_fraction if sched else None,
                "end_fraction": sched.end_fraction if sched else None}

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume exactly: step, pending update, masks (plain data)."""
        return {"version": STATE_VERSION, "config": self._config(), "step": self.step_count,
                "update_due": self.update_due, "history": [dict(h) for h in self.history],
                "masks": {w.name: w.layer.weight_mask.detach().cpu().clone() for w in self.weights}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a `state_dict`; the masks are installed (weights at inactive positions zeroed)."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise UserInputError("not a mask-engine state dict (version "
                                 f"{state.get('version') if isinstance(state, dict) else '?'}, expected {STATE_VERSION})")
        mine, theirs = self._config(), state["config"]
        differ = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if differ:
            what = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in differ.items())
            raise UserInputError(f"the saved mask engine was configured differently ({what})")
        names = {w.name for w in self.weights}
        if set(state["masks"]) != names:
            raise UserInputError(f"saved masks name other weights: missing {sorted(names - set(state['masks']))}, "
                                 f"unexpected {sorted(set(state['masks']) - names)}")
        for w in self.weights:
            w.layer.set_mask(state["masks"][w.name].to(w.param.device))
        self.step_count = int(state["step"])
        self.update_due = bool(state["update_due"])
        self.history = [dict(h) for h in state.get("history", [])]
        self.apply_masks()
        self._set_dense_grad(self._wants_dense_grad(self.step_count + 1))

    def remove(self) -> None:
        """Detach from the optimizer and leave the layers computing with ``W * M`` again."""
        self._hook.remove()
        for w in self.weights:
            w.layer.dense_grad = w.layer.engine_managed = False
        self._dense_mode = False


def _keep_largest(magnitude: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` active positions of largest magnitude (inactive ones never qualify)."""
    score = torch.where(mask, magnitude.float(), torch.full_like(magnitude, -1.0, dtype=torch.float32))
    kept = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
    if keep > 0:
        kept[score.flatten().topk(keep, sorted=False).indices] = True
    return kept.view_as(mask)


def _grow_best(kept: torch.Tensor, scores: torch.Tensor, grow: int) -> torch.Tensor:
    """``kept`` plus the ``grow`` best-scoring positions outside it (just-dropped ones included)."""
    score = torch.where(kept, torch.full_like(scores, float("-inf"), dtype=torch.float32), scores.float())
    new = kept.clone().flatten()
    if grow > 0:
        new[score.flatten().topk(grow, sorted=False).indices] = True
    return new.view_as(kept)


class DynamicMaskEngine(MaskEngine):
    """Base of the engines that drop and regrow on the paper's schedule (RigL, SET): they differ
    only in where they grow (`grow_scores`)."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int,
                 update_interval: int = 100, drop_fraction: float = 0.3, end_fraction: float = 0.75,
                 pattern: str = "unstructured", *, n: Optional[int] = None, m: Optional[int] = None,
                 seed: int = 0) -> None:
        schedule = UpdateSchedule(total_steps, update_interval, drop_fraction, end_fraction)
        super().__init__(module, optimizer, schedule, pattern, n, m, seed)


ENGINE_METHODS = ("static", "set", "rigl")


def make_engine(method: str, module: nn.Module, optimizer: torch.optim.Optimizer,
                total_steps: Optional[int] = None, **options: Any) -> MaskEngine:
    """The engine named ``method`` ("static", "set" or "rigl") for ``module`` and ``optimizer``.

    ``total_steps`` (optimizer steps in the run) is needed by SET and RigL; ``options`` are the
    engine's keyword arguments (``update_interval``, ``drop_fraction``, ``end_fraction``,
    ``pattern``, ``n``, ``m``, ``seed``). Used by the trainer integrations.
    """
    from .evolution import SET
    from .rigl import RigL
    from .static import Static
    if method not in ENGINE_METHODS:
        raise UserInputError(f"unknown sparse training method {method!r}: choose one of {', '.join(ENGINE_METHODS)}")
    if method == "static":
        unknown = set(options) - {"pattern", "n", "m", "seed"}
        if unknown:
            raise UserInputError(f"Static takes no {', '.join(sorted(unknown))} (it never updates the masks)")
        return Static(module, optimizer, **options)
    if not isinstance(total_steps, int) or total_steps < 1:
        raise UserInputError(f"{method} needs total_steps, the number of optimizer steps of the run (got {total_steps!r})")
    return {"set": SET, "rigl": RigL}[method](module, optimizer, total_steps, **options)
