"""The two inference engines sift checks and times ONNX files on: onnxruntime and DeepSparse.

``open_engine("deepsparse", path, batch_size=16)`` compiles the file and returns an `Engine`
whose ``run(feeds)`` takes ``{input name: array}`` and returns the outputs in order. DeepSparse
is an optional dependency (``pip install 'sift-compiler[deepsparse]'``; Python < 3.12, Linux
x86-64 or ARM): `deepsparse_status` says whether it can be used here and, if not, why and how to
install it. Its product analytics are switched off before it is imported.
"""
from __future__ import annotations

import contextlib
import os
import platform
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from ..errors import ExportError, UserInputError, first_line

ENGINES = ("deepsparse", "onnxruntime")
DEEPSPARSE_INSTALL = ("pip install 'sift-compiler[deepsparse]' (DeepSparse 1.8.0: CPython 3.8-3.11 on Linux "
                      "x86-64 with AVX2/AVX-512 or ARM v8.2+; evaluation licence, end of life since 2025-06)")

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")  # before any import of deepsparse or sparsezoo


def deepsparse_status() -> Tuple[bool, str]:
    """(usable, reason): can DeepSparse be imported on this machine? ``reason`` says why not."""
    if sys.version_info >= (3, 12):
        return False, f"DeepSparse needs Python < 3.12 (this is {platform.python_version()})"
    try:
        import deepsparse  # noqa: F401
    except ImportError as e:
        return False, f"DeepSparse is not installed ({e}); install it with: {DEEPSPARSE_INSTALL}"
    except Exception as e:  # a broken install (wrong onnx/numpy pin) must not kill onnxruntime runs
        return False, f"DeepSparse failed to import: {type(e).__name__}: {e}"
    return True, ""


@dataclass
class Engine:
    """A compiled model: ``run(feeds)`` returns its outputs as numpy arrays, in the file's output order."""

    name: str
    path: str
    batch_size: int
    num_cores: Optional[int]
    impl: object
    input_names: List[str]
    fraction_of_supported_ops: Optional[float] = None
    description: str = ""

    def run(self, feeds: Dict[str, np.ndarray]) -> List[np.ndarray]:
        if self.name == "onnxruntime":
            return self.impl.run(None, feeds)
        return self.impl.run([np.ascontiguousarray(feeds[name]) for name in self.input_names], val_inp=False)


def _onnxruntime(path: str, num_cores: Optional[int]):
    import onnxruntime as ort
    options = ort.SessionOptions()
    if num_cores:
        options.intra_op_num_threads = num_cores
        options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(f"onnxruntime cannot load {path}: {first_line(e)}") from e
    names = [i.name for i in session.get_inputs()]
    return session, names, f"onnxruntime {ort.__version__} CPU"


def _needs_fixed_shapes(path: str, batch_size: int, input_shapes) -> bool:
    """Whether some input has a symbolic dim besides the batch, or a static one the shapes change."""
    if not input_shapes:
        return False
    import onnx
    model = onnx.load(path, load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in inits]
    for value, shape in zip(inputs, input_shapes):
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(shape):
            return True
        for axis, (dim, size) in enumerate(zip(dims, shape)):
            fixed = dim.HasField("dim_value") and dim.dim_value > 0
            if (fixed and dim.dim_value != size) or (not fixed and axis > 0):
                return True
            if not fixed and axis == 0 and size != batch_size:
                return True
    return False


@contextlib.contextmanager
def _private_static_copy(path: str, input_shapes) -> Iterator[str]:
    """A temporary copy of ``path`` with every input dim fixed to ``input_shapes``.

    DeepSparse's own ``input_shapes`` option REWRITES THE USER'S FILE in place (deepsparse 1.8,
    ``override_onnx_input_shapes(inplace=True)``): sift must never let it touch the file it checks.
    """
    import onnx
    model = onnx.load(path)
    inits = {i.name for i in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in inits]
    for value, shape in zip(inputs, input_shapes):
        dims = value.type.tensor_type.shape.dim
        for dim, size in zip(dims, shape):
            dim.Clear()
            dim.dim_value = int(size)
    with tempfile.TemporaryDirectory(prefix="sift-ds-") as tmp:
        target = os.path.join(tmp, "model.onnx")
        large = model.ByteSize() > 2 ** 31 - 2 ** 26
        onnx.save_model(model, target, save_as_external_data=large, all_tensors_to_one_file=True,
                        location="model.onnx.data" if large else None)
        del model
        yield target


def _deepsparse(path: str, batch_size: int, num_cores: Optional[int], input_shapes):
    usable, reason = deepsparse_status()
    if not usable:
        raise UserInputError(reason)
    import deepsparse
    try:
        if _needs_fixed_shapes(path, batch_size, input_shapes):
            with _private_static_copy(path, input_shapes) as copy:
                engine = deepsparse.Engine(copy, batch_size=batch_size, num_cores=num_cores)
        else:  # only the batch is dynamic: DeepSparse sets it itself without writing any file
            engine = deepsparse.Engine(path, batch_size=batch_size, num_cores=num_cores)
    except Exception as e:
        raise ExportError(f"DeepSparse cannot compile {path}: {type(e).__name__}: "
                          f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}") from e
    describe = (f"DeepSparse {deepsparse.__version__} ({engine.cpu_avx_type}"
                f"{', VNNI' if engine.cpu_vnni else ''}, {engine.num_cores} cores)")
    return engine, list(engine.input_names), describe


def open_engine(name: str, path: str, batch_size: int, num_cores: Optional[int] = None,
                input_shapes: Optional[List[List[int]]] = None) -> Engine:
    """Load ``path`` in engine ``name`` for ``batch_size`` samples per run.

    ``input_shapes`` fixes every input's shape for DeepSparse (needed when dims other than the
    batch are symbolic, e.g. a sequence length; compiled from a private copy, ``path`` is never
    written); onnxruntime takes any shape at run time.
    """
    if name == "onnxruntime":
        impl, names, describe = _onnxruntime(path, num_cores)
        return Engine(name, path, batch_size, num_cores, impl, names, None, describe)
    if name == "deepsparse":
        impl, names, describe = _deepsparse(path, batch_size, num_cores, input_shapes)
        return Engine(name, path, batch_size, num_cores, impl, names,
                      float(impl.fraction_of_supported_ops), describe)
    raise UserInputError(f"unknown engine {name!r}: choose from {', '.join(ENGINES)}")
