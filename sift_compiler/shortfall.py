"""Did a compilation do what was asked? ``shortfalls(unit)`` says what it could not do.

A transform is not applied as asked when:

1. Sparse Wide kept layers at width for a reason other than the model's interface, ``--attention-width
   keep`` or head counts (an op without a coupling rule, a partial slice, a size the axis algebra
   cannot follow): the model is less wide than asked;
2. the experts of a mixture-of-experts block stay fused (a layout `capture.experts` cannot
   rewrite, named with its module and source line): they stay dense;
3. weight FLOPs sit in ops no transform rewrites (ConvTranspose, an einsum or matmul with a parameter,
   a functional linear): those stay dense;
4. the compensated sparsity s' is far from s: the sparse layers' density (1 - s') / (1 - s) is
   outside [0.5, 1.5] (much denser: the model is barely transformed; much sparser: the layers that
   stay dense eat the FLOP budget), or no layer could be transformed at all.

`sift.compile` warns with the first cause (a `SiftWarning`, one line) and lists them all in the
report's notes; ``strict=True`` (``--strict``) raises `ShortfallError` instead.
"""
from __future__ import annotations

import warnings
from typing import List, Optional

from .capture.experts import EXPERTS_KEPT_FUSED
from .analyses.flops import FlopAnalysis
from .errors import ShortfallError, SiftWarning
from .sparsity.layers import MaskedLayer

DENSITY_RANGE = (0.5, 1.5)
UNREWRITTEN_SHARE = 0.01
# Sparse Wide's note when the model's outputs keep a sparse layer's side at width: why it is denser
OUTPUT_FIXES_WIDTH = "the model's outputs fix the hidden width of sparse layers"  # weight FLOPs left in ops no transform rewrites, as a share of all


def shortfalls(unit) -> List[str]:
    """One line per way ``unit``'s transform fell short of the request, the most telling first."""
    config = unit.config
    if config.transform == "none" or config.sparsity == 0:
        return []
    found: List[str] = []
    kept = [(path, d.notes[0]) for path, d in unit.decisions.items() if d.notes]
    if kept:
        path, why = kept[0]
        found.append(f"{len(kept)} layer{'s' if len(kept) > 1 else ''} kept at width on some side, first "
                     f"'{path}' {why}")
    found += [note for note in unit.notes if note.startswith(EXPERTS_KEPT_FUSED)]
    found += _unrewritten(unit)
    if unit.effective_sparsity is None:
        found.append("no layer could be transformed (every weight layer stays dense)")
    else:
        ratio = (1 - unit.effective_sparsity) / (1 - config.sparsity)
        if not DENSITY_RANGE[0] <= ratio <= DENSITY_RANGE[1]:
            side = "denser" if ratio > 1 else "sparser"
            why = next((note for note in unit.notes if note.startswith(OUTPUT_FIXES_WIDTH)), None) \
                if ratio > 1 else _dense_share(unit)
            found.append(f"the sparse layers are at s' = {unit.effective_sparsity:.4f}, {side} than the requested "
                         f"s = {config.sparsity:g} by a factor {max(ratio, 1 / ratio):.2f} in density"
                         + (f": {why}" if why else ""))
    return found


def _dense_share(unit) -> Optional[str]:
    """What the layers that stay dense take of the dense model's weight FLOPs, and the costliest
    of them (a widened LM head in a small model): why the sparse layers are sparser than asked."""
    if unit.baseline is None or unit.baseline.weight_dense <= 0:
        return None
    gm = unit.module
    masked = {n.name for n in gm.graph.nodes if n.op == "call_module"
              and isinstance(gm.get_submodule(str(n.target)), MaskedLayer)}
    dense = {f.target: f.dense for name, f in unit.analyses.get(FlopAnalysis).nodes.items()
             if f.category == "weight" and name not in masked}
    if not dense:
        return None
    target = unit.baseline.weight_dense
    costliest = max(dense, key=dense.__getitem__)
    return (f"the layers that stay dense take {sum(dense.values()) / target:.0%} of the dense model's weight "
            f"FLOPs, '{costliest}' alone {dense[costliest] / target:.0%}")


def _unrewritten(unit) -> List[str]:
    if unit.baseline is None or unit.baseline_layers is None or unit.baseline.weight_dense <= 0:
        return []
    rewritable = {n for layer in unit.baseline_layers.layers.values() if layer.kind in ("linear", "conv")
                  for n in layer.nodes}
    left = [f for name, f in unit.baseline.nodes.items() if f.category == "weight" and name not in rewritable]
    share = sum(f.dense for f in left) / unit.baseline.weight_dense
    if share <= UNREWRITTEN_SHARE:
        return []
    ops = sorted({f.target if f.kind in ("conv_transpose", "linear", "conv") else f.kind for f in left})
    return [f"{share:.0%} of the weight FLOPs are in ops no transform rewrites ({', '.join(ops[:4])}): they stay dense"]


def summary(unit, found: List[str]) -> str:
    """The one line a user sees: what was asked and the main cause."""
    more = f" (+{len(found) - 1} more in the report notes)" if len(found) > 1 else ""
    return f"{unit.config.transform} at s = {unit.config.sparsity:g} not applied as asked: {found[0]}{more}"


def check_as_asked(unit) -> None:
    """Record every shortfall in the notes; warn with the main one, or raise with ``strict``."""
    found = shortfalls(unit)
    if not found:
        return
    unit.notes.extend(f"not as asked: {cause}" for cause in found)
    if unit.config.strict:
        raise ShortfallError(summary(unit, found) + " (strict mode)")
    warnings.warn(summary(unit, found), SiftWarning, stacklevel=3)
