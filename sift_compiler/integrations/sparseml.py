"""SparseML recipes for compiled models: keep the Sparse-IFT masks with SparseML's own manager.

``recipe(module, method)`` writes a SparseML recipe (YAML) whose pruning modifiers name exactly
the sparse weights of a compiled module:

* ``"constant"``: a ``ConstantPruningModifier``, which keeps every zero weight at zero (static
  sparse training, the paper's baseline);
* ``"rigl"``: ``RigLPruningModifier``s (one per distinct layer sparsity, since SparseML takes one
  ``final_sparsity`` per modifier) with the paper's schedule converted to epochs: update every
  ``update_interval`` steps until ``end_fraction`` of training, drop fraction 0.3 cosine-decayed,
  uniform per-layer sparsity, momentum reset for regrown weights.

The recipe text needs nothing from SparseML; running it does::

    text = recipe(result.module, "rigl", epochs=10, steps_per_epoch=len(loader))
    release_masks(result.module)                  # SparseML owns the masks while it trains
    manager = ScheduledModifierManager.from_yaml(text)
    optimizer = manager.modify(result.module, optimizer, steps_per_epoch=len(loader),
                               grad_sampler={"data_loader_builder": ..., "loss_function": ...})  # rigl only
    ...train...
    manager.finalize(result.module)
    adopt_masks(result.module)                    # the final zeros become the masks again

Why `release_masks`: sift's layers multiply by their own mask in forward, so a weight SparseML
regrows would get no gradient while sift's mask still hides it. Releasing opens the layers'
masks (weights keep their zeros); `adopt_masks` turns the zeros SparseML leaves back into masks.
For ``"constant"`` releasing is optional (both sets of masks agree) but shows that SparseML
alone keeps the sparsity.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from ..errors import UserInputError
from ..io import atomic_path, check_writable
from ..sparsity.engine import unwrap
from ..sparsity.layers import iter_masked

METHODS = ("constant", "rigl")


def sparse_weights(module: nn.Module) -> Dict[str, float]:
    """``{parameter name: target sparsity}`` of the sparse masked weights of a compiled module."""
    out = {}
    for name, layer in iter_masked(unwrap(module)):
        if layer.target_density < 1:
            out[f"{name}.weight" if name else "weight"] = 1.0 - float(layer.target_density)
    return out


def recipe(module: nn.Module, method: str = "constant", *, epochs: float = 1.0,
           steps_per_epoch: Optional[int] = None, update_interval: int = 100, drop_fraction: float = 0.3,
           end_fraction: float = 0.75, num_grads: int = 1, path: Optional[str] = None) -> str:
    """A SparseML recipe (YAML text) keeping ``module``'s sparse weights sparse; also written to ``path``.

    ``epochs``: length of the schedule. For ``"rigl"``, ``steps_per_epoch`` converts the step
    schedule (``update_interval``, ``end_fraction``) into SparseML's epochs; ``num_grads``:
    batches SparseML's gradient sampler collects per update.
    """
    if method not in METHODS:
        raise UserInputError(f"unknown SparseML recipe method {method!r}: choose 'constant' or 'rigl' "
                             f"(SparseML has no SET modifier)")
    if not isinstance(epochs, (int, float)) or epochs <= 0:
        raise UserInputError(f"epochs must be a positive number, got {epochs!r}")
    weights = sparse_weights(module)
    if not weights:
        raise UserInputError("the module has no sparse masked weights to name in a recipe; compile it first, e.g. "
                             "sift_compiler.compile(model, transform='parallel', sparsity=0.75, example_inputs=(x,))")
    for name, sparsity in weights.items():
        if not 0 < sparsity < 1:
            raise UserInputError(f"{name!r} has sparsity {sparsity}, outside (0, 1)")
    lines = ["version: 1.1.0", "", "modifiers:", "  - !EpochRangeModifier", "    start_epoch: 0.0",
             f"    end_epoch: {float(epochs)!r}", ""]
    if method == "constant":
        lines += ["  - !ConstantPruningModifier", "    start_epoch: 0.0", f"    end_epoch: {float(epochs)!r}",
                  "    params:", *_yaml_list(sorted(weights))]
    else:
        lines += _rigl_modifiers(weights, epochs, steps_per_epoch, update_interval, drop_fraction, end_fraction,
                                 num_grads)
    text = "\n".join(["# SparseML recipe written by sift_compiler.integrations.sparseml.recipe "
                      f"(method={method!r}, {len(weights)} sparse weights)", *lines, ""])
    if path is not None:
        check_writable(path, "recipe")
        with atomic_path(path) as tmp:
            with open(tmp, "w") as f:
                f.write(text)
    return text


def _rigl_modifiers(weights: Dict[str, float], epochs: float, steps_per_epoch: Optional[int], update_interval: int,
                    drop_fraction: float, end_fraction: float, num_grads: int) -> List[str]:
    if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
        raise UserInputError(f"method='rigl' needs steps_per_epoch (a positive integer, e.g. len(loader)) to turn "
                             f"the update interval of {update_interval} steps into epochs; got {steps_per_epoch!r}")
    if not 0 < drop_fraction <= 1 or not 0 < end_fraction <= 1:
        raise UserInputError(f"drop_fraction and end_fraction must lie in (0, 1], got {drop_fraction}, {end_fraction}")
    frequency = update_interval / steps_per_epoch
    end = end_fraction * epochs
    if frequency >= end:
        raise UserInputError(f"no mask update would happen: one every {update_interval} steps ({frequency:g} epochs) "
                             f"but updates stop at epoch {end:g}; lower update_interval or train longer")
    groups: Dict[float, List[str]] = defaultdict(list)
    for name, sparsity in weights.items():
        groups[round(sparsity, 4)].append(name)  # SparseML: one final_sparsity per modifier
    lines: List[str] = []
    for sparsity, names in sorted(groups.items()):
        lines += ["  - !RigLPruningModifier", f"    final_sparsity: {sparsity!r}", "    start_epoch: 0.0",
                  f"    end_epoch: {end!r}", f"    update_frequency: {frequency!r}",
                  f"    init_update_fraction: {float(drop_fraction)!r}", "    sparsity_strategy: uniform",
                  "    global_sparsity: false", "    mask_type: unstructured", "    momentum_buffer_reset: true",
                  "    leave_enabled: true", f"    num_grads: {int(num_grads)}", "    params:",
                  *_yaml_list(sorted(names)), ""]
    return lines


def _yaml_list(items: List[str]) -> List[str]:
    return [f"      - '{item}'" for item in items]


@torch.no_grad()
def release_masks(module: nn.Module) -> Dict[str, int]:
    """Open the in-forward masks of the sparse layers (weights keep their zeros) so SparseML's
    masks alone decide what trains; returns ``{parameter name: non-zeros}``."""
    released = {}
    for name, layer in iter_masked(unwrap(module)):
        if layer.target_density < 1:
            released[f"{name}.weight" if name else "weight"] = int(layer.weight_mask.sum())
            layer.weight_mask.fill_(True)
    return released


@torch.no_grad()
def adopt_masks(module: nn.Module) -> Dict[str, float]:
    """Make the zeros SparseML left in the sparse weights their masks again; returns the densities."""
    densities = {}
    for name, layer in iter_masked(unwrap(module)):
        if layer.target_density < 1:
            layer.set_mask(layer.weight != 0)
            densities[f"{name}.weight" if name else "weight"] = layer.density
    return densities
