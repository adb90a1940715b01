"""The outcome policy of an export: what happens when DeepSparse cannot be trusted with a file.

Every export ends in one of five outcomes (``ExportInfo.outcome``, `OUTCOMES`):

======================  ======================================================================
``ok``                  every check holds as exported
``remedied``            a check failed, and a remedy below made every check hold; the file
                        written is the remedied one and the notes say what changed and why
``not-for-deepsparse``  only DeepSparse's checks fail (it aborts, hangs, or disagrees with
                        onnxruntime) and no remedy helps. The file is correct (onnxruntime agrees
                        with torch), so it is written, with ``sift.deepsparse`` in its metadata
                        saying DeepSparse must not run it and why (`sift-check` reports it);
                        ``sift-compile`` says so in one line and exits 1. With
                        ``deepsparse="require"`` it is a failure instead and nothing is written
``unchecked``           DeepSparse did not check the file (not installed, skipped, no verify)
``failed``              a check failed and no remedy helped, with ``strict=False``: the file is
                        written anyway and ``info.verification`` lists the failures
======================  ======================================================================

Any other failed check (onnxruntime against torch, sparsity, the onnx checker) means the file is
wrong: nothing is written (`VerificationFailed`, exit 1). Remedies are tried in this order, each
at most once, each on top of the ones before; the first export that verifies is kept:

1. ``static-shapes``: the file fails at a second batch size or sequence length (the model fixes a
   size somewhere): export with the example's fixed shapes. A correctness remedy, for any runtime;
2. ``stacked-parallel`` (form ``auto``): Sparse Parallel branches written as ``stacked-conv``, one
   layer per input instead of a sum of layers (exporters/forms.py);
3. ``concat-doped``: Sparse Doped Linears written as one matmul over ``[x, U x]``, which DeepSparse
   compiles where the trained form aborts it (exporters/doped_form.py).

Remedies that change the model itself (Sparse Wide with channels rounded to multiples of 8) need
the model, not a finished module: `compile_remedies` lists them and ``sift-compile`` drives them (`remedies`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from ..registry import get_transform
from .checks import OTHER_SHAPE_CHECK, Verification
from .forms import SAFE_FORM
from .settings import ExportSettings
from .weights import META_DEEPSPARSE, not_for_deepsparse, set_metadata  # noqa: F401  (not_for_deepsparse: re-exported)

OUTCOMES = ("ok", "remedied", "not-for-deepsparse", "unchecked", "failed")
DEEPSPARSE_CHECKS = ("deepsparse-compiles", "deepsparse-supported-ops", "deepsparse-vs-onnxruntime")


@dataclass
class Remedy:
    """A change to the export settings, and the note that says why it was made."""

    name: str
    changes: Dict[str, Any]
    note: str


@dataclass
class Attempt:
    """What one export tried and what its verification found (the state a remedy rule reads)."""

    settings: ExportSettings                  # what this attempt was written with
    verification: Optional[Verification]
    branch_groups: Sequence[str] = ()         # Sparse Parallel layers written as activated branches
    doped_linears: int = 0                    # Sparse Doped Linears written as trained
    shapes: str = ""
    remedies: List[str] = field(default_factory=list)


def failed(verification: Optional[Verification], check: str) -> bool:
    return verification is not None and any(c.name == check and not (c.ok or c.skipped)
                                            for c in verification.checks)


def deepsparse_failure(verification: Optional[Verification]) -> Optional[str]:
    """One line saying why DeepSparse must not run the file, when DeepSparse's checks are the only failures."""
    if verification is None:
        return None
    bad = [c for c in verification.checks if not (c.ok or c.skipped)]
    if not bad or any(c.name not in DEEPSPARSE_CHECKS for c in bad):
        return None
    return "; ".join(f"{c.name}: {c.detail}" for c in bad)


def deepsparse_checked(verification: Optional[Verification]) -> bool:
    return verification is not None and any(c.name == "deepsparse-compiles" and not c.skipped
                                            for c in verification.checks)


# ---------------------------------------------------------------------------------------------
# Remedy rules: Attempt -> Remedy or None, in the order they are tried


def static_shapes_rule(attempt: Attempt) -> Optional[Remedy]:
    if not (attempt.settings.dynamic_batch and failed(attempt.verification, OTHER_SHAPE_CHECK)):
        return None
    detail = next(c.detail for c in attempt.verification.checks if c.name == OTHER_SHAPE_CHECK)
    return Remedy("static-shapes", {"dynamic_batch": False},
                  f"static input shapes {attempt.shapes}: the file did not run correctly at another batch size "
                  f"or sequence length ({detail})")


def stacked_parallel_rule(attempt: Attempt) -> Optional[Remedy]:
    if attempt.settings.form != "auto" or not attempt.branch_groups:
        return None
    verification = attempt.verification
    if failed(verification, "deepsparse-vs-onnxruntime"):
        error = verification.errors["deepsparse-vs-onnxruntime"]
        what = f"DeepSparse disagreed with onnxruntime on the branch form of"
        how = error.describe()
    else:
        what, how = "DeepSparse failed on the branch form of", _detail(verification, "deepsparse-compiles")
    return Remedy("stacked-parallel", {"form": SAFE_FORM},
                  f"{what} {len(attempt.branch_groups)} Sparse Parallel layers ({how}): exported as {SAFE_FORM} "
                  "instead")


def concat_doped_rule(attempt: Attempt) -> Optional[Remedy]:
    if attempt.settings.doped != "trained" or not attempt.doped_linears:
        return None
    return Remedy("concat-doped", {"doped": "concat"},
                  f"DeepSparse failed on {attempt.doped_linears} Sparse Doped Linear layers as trained "
                  f"({_first_failure(attempt.verification)}): exported as one matmul over [x, U x] instead")


CORRECTNESS_REMEDIES: List[Callable[[Attempt], Optional[Remedy]]] = [static_shapes_rule]
DEEPSPARSE_REMEDIES: List[Callable[[Attempt], Optional[Remedy]]] = [stacked_parallel_rule, concat_doped_rule]


def next_remedy(attempt: Attempt) -> Optional[Remedy]:
    """The first remedy not yet applied that addresses what failed in ``attempt`` (None: nothing left)."""
    rules = list(CORRECTNESS_REMEDIES)
    if deepsparse_failure(attempt.verification) is not None:
        rules += DEEPSPARSE_REMEDIES
    for rule in rules:
        remedy = rule(attempt)
        if remedy is not None and remedy.name not in attempt.remedies:
            return remedy
    return None


def _detail(verification: Verification, check: str) -> str:
    return next((c.detail for c in verification.checks if c.name == check), "")


def _first_failure(verification: Verification) -> str:
    bad = next((c for c in verification.checks if not (c.ok or c.skipped)), None)
    return f"{bad.name}: {bad.detail}" if bad is not None else ""


# ---------------------------------------------------------------------------------------------
# Remedies that need the model


def compile_remedies(transform: str, channel_multiple: int) -> List[Remedy]:
    """Recompilations that may give DeepSparse a file it runs, tried after the export remedies fail
    (``channel_multiple``: what the model's widened channels were rounded to, `CompileConfig.channel_multiple`)."""
    remedies = []
    if get_transform(transform).widens and channel_multiple % 8:
        remedies.append(Remedy("round-to-8", {"round_to": 8},
                               "Sparse Wide recompiled with channels rounded to multiples of 8 (--round-to 8)"))
    return remedies


def mark_not_for_deepsparse(path: str, reason: str) -> None:
    """Record in the file's metadata that DeepSparse must not run it, and why (read by sift-check, sift-bench)."""
    import onnx  # lazy: onnx takes 0.2 s to import, and `import sift_compiler` does not need it
    model = onnx.load(path, load_external_data=False)  # external weights stay where they are
    set_metadata(model, META_DEEPSPARSE, {"runs": False, "reason": reason})
    onnx.save_model(model, path)
