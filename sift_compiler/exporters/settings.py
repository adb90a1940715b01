"""`ExportSettings`: how `export_onnx` writes and checks a file, frozen (a remedy makes a changed copy).

One object instead of keyword lists restated along the way: `export_onnx` takes it (or its fields
as keywords), each export attempt carries it, and the remedies of `outcome` change it with
``dataclasses.replace`` (``{"form": "stacked-conv"}``, ``{"dynamic_batch": False}``, ``{"doped": "concat"}``).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Dict, Optional, Tuple

from ..errors import UserInputError
from .checks import DEFAULT_RTOL
from .forms import DEFAULT_FORM, FORMS

SUPPORTED_OPSETS = range(13, 18)
DEEPSPARSE_MODES = ("auto", "require", "skip")
DOPED_FORMS = ("trained", "concat")


@dataclass(frozen=True)
class ExportSettings:
    """Everything `export_onnx` may be told (see its docstring for what each does)."""

    opset: int = 17
    dynamic_batch: bool = True
    input_names: Optional[Tuple[str, ...]] = None
    fold_batch_norm: bool = True
    form: str = DEFAULT_FORM                  # how Sparse Parallel layers are written (`forms.FORMS`)
    external_data: Optional[bool] = None      # None: decided by size
    verify: bool = True
    strict: bool = True
    rtol: float = DEFAULT_RTOL
    deepsparse: str = "auto"
    min_supported_ops: Optional[float] = None
    doped: str = "trained"                    # Sparse Doped Linears as trained, or "concat" (one matmul)

    def __post_init__(self) -> None:
        if self.opset not in SUPPORTED_OPSETS:
            raise UserInputError(f"opset {self.opset} is not supported: use 13 to 17 (DeepSparse 1.8 loads <= 19, "
                                 "the TorchScript exporter is reliable up to 17)")
        if self.form not in FORMS:
            raise UserInputError(f"unknown export form {self.form!r}: choose one of {', '.join(FORMS)}")
        if self.deepsparse not in DEEPSPARSE_MODES:
            raise UserInputError(f"deepsparse must be 'auto', 'require' or 'skip', got {self.deepsparse!r}")
        if self.doped not in DOPED_FORMS:
            raise UserInputError(f"doped must be one of {', '.join(DOPED_FORMS)}, got {self.doped!r}")
        if self.input_names is not None and not isinstance(self.input_names, tuple):
            object.__setattr__(self, "input_names", tuple(self.input_names))

    @staticmethod
    def of(settings: Optional["ExportSettings"] = None, **keywords: Any) -> "ExportSettings":
        """``settings`` (default: the defaults) with ``keywords`` replaced; a keyword that is no field is refused."""
        names = [f.name for f in fields(ExportSettings)]
        unknown = sorted(set(keywords) - set(names))
        if unknown:
            raise UserInputError(f"unknown export options {', '.join(unknown)}: the options are the fields of "
                                 f"ExportSettings ({', '.join(names)})")
        base: Dict[str, Any] = {f: getattr(settings, f) for f in names} if settings is not None else {}
        return ExportSettings(**{**base, **keywords})

    def describe(self) -> str:
        """'form stacked-conv, static shapes': what a remedied attempt changed, for messages."""
        return f"form {self.form}" + ("" if self.dynamic_batch else ", static shapes") + \
            ("" if self.doped == "trained" else f", doped {self.doped}")
