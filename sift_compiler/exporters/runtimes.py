"""The inference engines sift checks and times models on: DeepSparse, onnxruntime, OpenVINO and torch.

=====================  ================================================================================
``deepsparse``         DeepSparse 1.8 (sparse kernels: skips exact zeros), in a child process
``onnxruntime``        onnxruntime's CPU provider (dense kernels: computes the zeros)
``openvino``           OpenVINO's CPU plugin (dense FP32 kernels)
``openvino-sparse``    the same with ``CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE`` set: OpenVINO stores
                       sparse weights compressed, where its CPU plugin supports it (INT8 fully
                       connected layers on AMX CPUs; elsewhere it computes as ``openvino``)
``torch``              the compiled torch model itself, masks baked (eager)
``torch-compile``      the same under ``torch.compile``                   (`torch_runtime`)
``torch-csr``          eager, Linear weights in CSR (``torch.sparse.mm``); convs stay dense
=====================  ================================================================================

The ONNX engines read the ``.onnx`` file; the torch engines run the compiled module (the CLIs
load the ``.sift.pt`` that ``sift-compile -o`` writes beside the ONNX file). Engines that are
not installed say how to install them (`engine_status`).

``open_engine("deepsparse", path, batch_size=16)`` compiles the file and returns an `Engine`
whose ``run(feeds)`` takes ``{input name: array}`` and returns the outputs in order, and whose
``time(feeds, warmup, iterations)`` returns per-batch latencies. DeepSparse always runs in a
child process (`deepsparse_worker`): a native abort, a hang or an out-of-memory kill there
raises `EngineCrash` with one line of reason and leaves this process as it was; timing loops
run inside the child. Close engines (``with open_engine(...) as engine``) to end the child.

DeepSparse is an optional dependency (``pip install 'sift-compiler[deepsparse]'``; Python < 3.12,
Linux x86-64 or ARM): `deepsparse_status` says whether it can be used here and, if not, why and
how to install it; it is never imported in this process. Its product analytics are switched off.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from ..errors import ExportError, UserInputError, first_line
from .deepsparse_worker import DEFAULT_TIMEOUT_S, DeepSparseWorker, WorkerCrash, WorkerError
from .torch_runtime import open_torch

ENGINES = ("deepsparse", "onnxruntime", "openvino", "openvino-sparse", "torch", "torch-compile", "torch-csr")
TORCH_ENGINES = ("torch", "torch-compile", "torch-csr")
OPENVINO_INSTALL = "pip install 'sift-compiler[openvino]' (OpenVINO 2025 or later)"
SPARSE_WEIGHTS_RATE = 0.5   # openvino-sparse: weights at least this sparse are stored compressed
DEEPSPARSE_INSTALL = ("pip install 'sift-compiler[deepsparse]' (DeepSparse 1.8.0: CPython 3.8-3.11 on Linux "
                      "x86-64 with AVX2/AVX-512 or ARM v8.2+; evaluation licence, end of life since 2025-06)")

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")  # before any import of deepsparse or sparsezoo


class EngineCrash(ExportError):
    """The DeepSparse child died or hung (native abort, signal, time limit); the message is one line."""


def deepsparse_status() -> Tuple[bool, str]:
    """(usable, reason): can DeepSparse be used on this machine? ``reason`` says why not.

    Asked of a child process once per process (an import that aborts must not take this one).
    """
    if sys.version_info >= (3, 12):
        return False, f"DeepSparse needs Python < 3.12 (this is {platform.python_version()})"
    try:
        spec = importlib.util.find_spec("deepsparse")
    except (ImportError, ValueError) as e:
        spec, error = None, e
    else:
        error = "no module named 'deepsparse'"
    if spec is None:
        return False, f"DeepSparse is not installed ({error}); install it with: {DEEPSPARSE_INSTALL}"
    version, reason = _probe()
    return (True, "") if version else (False, reason)


@functools.lru_cache(maxsize=1)
def _probe() -> Tuple[str, str]:
    """(DeepSparse version, "") or ("", why it does not import), asked of a worker."""
    worker = _take_worker()
    try:
        version = worker.request("probe", timeout_s=120)["version"]
    except WorkerError as e:  # a broken install (wrong onnx/numpy pin) must not kill onnxruntime runs
        worker.close()
        return "", f"DeepSparse failed to import: {e}"
    _give_back(worker)
    return version, ""


_IDLE: List[DeepSparseWorker] = []   # at most one live worker waiting for the next file (imports once)


def _take_worker() -> DeepSparseWorker:
    while _IDLE:
        worker = _IDLE.pop()
        if worker.alive:
            return worker
        worker.close()
    return DeepSparseWorker()


def _give_back(worker: DeepSparseWorker) -> None:
    """Drop the worker's engine and keep it for the next file, or end it (dead, or one is already waiting)."""
    if worker.alive and not _IDLE:
        try:
            worker.request("release", timeout_s=60)
        except WorkerError:
            worker.close()
            return
        _IDLE.append(worker)
    else:
        worker.close()


def engine_status(name: str) -> Tuple[bool, str]:
    """(usable, reason) for any engine of `ENGINES`: is it installed here, and if not, how to get it."""
    if name == "deepsparse":
        return deepsparse_status()
    module = {"onnxruntime": "onnxruntime", "openvino": "openvino", "openvino-sparse": "openvino"}.get(name, "torch")
    if name not in ENGINES:
        return False, f"unknown engine {name!r}: choose from {', '.join(ENGINES)}"
    if importlib.util.find_spec(module) is None:
        how = OPENVINO_INSTALL if module == "openvino" else f"pip install {module}"
        return False, f"{name} is not installed; install it with: {how}"
    return True, ""


def deepsparse_version() -> Optional[str]:
    """The installed DeepSparse's version, or None when it cannot be used here."""
    return _probe()[0] if deepsparse_status()[0] else None


@dataclass
class Engine:
    """A compiled model: ``run(feeds)`` returns its outputs as numpy arrays, in the file's output order."""

    name: str
    path: str
    batch_size: int
    num_cores: Optional[int]
    impl: object                 # a callable (feeds -> outputs) in this process, or the DeepSparse worker
    input_names: List[str]
    fraction_of_supported_ops: Optional[float] = None
    description: str = ""
    timeout_s: float = DEFAULT_TIMEOUT_S

    def run(self, feeds: Dict[str, np.ndarray]) -> List[np.ndarray]:
        if not isinstance(self.impl, DeepSparseWorker):
            if self.impl is None:
                raise ExportError(f"the {self.name} engine of {self.path} was closed")
            return self.impl(feeds)
        return self._ask("run", feeds=feeds)["outputs"]

    def time(self, feeds: Dict[str, np.ndarray], warmup: int, iterations: int,
             tick: Optional[Callable[[], None]] = None) -> List[float]:
        """Per-batch latencies in ms of ``iterations`` runs after ``warmup`` untimed ones (in the engine's process)."""
        if isinstance(self.impl, DeepSparseWorker):
            latencies = self._ask("time", feeds=feeds, warmup=warmup, iterations=iterations)["latencies_ms"]
            for _ in range(warmup + iterations):
                if tick:
                    tick()
            return latencies
        for _ in range(warmup):
            self.run(feeds)
            if tick:
                tick()
        latencies = []
        for _ in range(iterations):
            start = time.perf_counter()
            self.run(feeds)
            latencies.append((time.perf_counter() - start) * 1000.0)
            if tick:
                tick()
        return latencies

    def _ask(self, op: str, **arguments):
        if self.impl is None:
            raise ExportError(f"the DeepSparse engine of {self.path} was closed")
        try:
            return self.impl.request(op, timeout_s=self.timeout_s, **arguments)
        except WorkerCrash as e:
            raise EngineCrash(str(e)) from None
        except WorkerError as e:
            raise ExportError(f"DeepSparse failed to {op} {self.path}: {e}") from None

    def close(self) -> None:
        if isinstance(self.impl, DeepSparseWorker):
            _give_back(self.impl)
        self.impl = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _onnxruntime(path: str, num_cores: Optional[int]):
    import onnxruntime as ort  # lazy: slow to import, and only this engine uses it
    options = ort.SessionOptions()
    if num_cores:
        options.intra_op_num_threads = num_cores
        options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(f"onnxruntime cannot load {path}: {first_line(e)}") from e
    names = [i.name for i in session.get_inputs()]
    return (lambda feeds: session.run(None, feeds)), names, f"onnxruntime {ort.__version__} CPU"


def _openvino(path: str, num_cores: Optional[int], input_shapes, sparse: bool):
    """An OpenVINO CPU model compiled for ``input_shapes`` (static shapes run fastest); one infer request."""
    import openvino as ov  # optional (the [openvino] extra)
    core = ov.Core()
    # f32: on CPUs with bf16 (AVX512-BF16, AMX) OpenVINO otherwise computes in bf16 (1e-3 off, and not the same race)
    config: Dict[str, object] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    if num_cores:
        config["INFERENCE_NUM_THREADS"] = num_cores
    if sparse:
        config["CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE"] = SPARSE_WEIGHTS_RATE
    try:
        model = core.read_model(path)
        names = [i.get_any_name() for i in model.inputs]
        if input_shapes:
            model.reshape({name: ov.PartialShape(list(shape)) for name, shape in zip(names, input_shapes)})
        compiled = core.compile_model(model, "CPU", config)
    except Exception as e:
        raise ExportError(f"OpenVINO cannot load {path}: {first_line(e)}") from e
    request = compiled.create_infer_request()
    count = len(compiled.outputs)

    def run(feeds):
        request.infer(feeds)
        return [np.array(request.get_output_tensor(i).data, copy=True) for i in range(count)]
    describe = f"OpenVINO {ov.get_version().split('-')[0]} CPU" + (
        f", CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE {SPARSE_WEIGHTS_RATE}" if sparse else "")
    return run, names, describe


def _deepsparse(path: str, batch_size: int, num_cores: Optional[int], input_shapes, timeout_s: float) -> Engine:
    usable, reason = deepsparse_status()
    if not usable:
        raise UserInputError(reason)
    worker = _take_worker()
    try:
        info = worker.request("compile", timeout_s=timeout_s, path=os.path.abspath(path), batch_size=batch_size,
                              num_cores=num_cores, input_shapes=input_shapes)
    except WorkerCrash as e:
        worker.close()
        raise EngineCrash(f"DeepSparse cannot compile {path}: {e}") from None
    except WorkerError as e:
        worker.close()
        raise ExportError(f"DeepSparse cannot compile {path}: {e}") from None
    return Engine("deepsparse", path, batch_size, num_cores, worker, info["input_names"],
                  info["fraction_of_supported_ops"], info["description"], timeout_s)


def open_engine(name: str, path: str, batch_size: int, num_cores: Optional[int] = None,
                input_shapes: Optional[List[List[int]]] = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                module=None) -> Engine:
    """Load ``path`` in engine ``name`` for ``batch_size`` samples per run.

    ``input_shapes`` fixes every input's shape for DeepSparse (needed when dims other than the
    batch are symbolic, e.g. a sequence length; compiled from a private copy, ``path`` is never
    written) and OpenVINO (compiled for them); onnxruntime and torch take any shape at run time.
    The torch engines run ``module`` (the compiled model, e.g. ``sift.load("m.sift.pt").module``;
    ``path`` then only names it). ``timeout_s`` limits each DeepSparse
    request (compile, run, timing loop); past it the child is killed and `EngineCrash` raised.
    """
    if name == "deepsparse":
        return _deepsparse(path, batch_size, num_cores, input_shapes, timeout_s)
    if name not in ENGINES:
        raise UserInputError(f"unknown engine {name!r}: choose from {', '.join(ENGINES)}")
    usable, reason = engine_status(name)
    if not usable:
        raise UserInputError(reason)
    if name == "onnxruntime":
        impl, names, describe = _onnxruntime(path, num_cores)
    elif name in ("openvino", "openvino-sparse"):
        impl, names, describe = _openvino(path, num_cores, input_shapes, sparse=name == "openvino-sparse")
    else:
        impl, describe = open_torch(module, name, num_cores)
        names = []  # positional: the feeds' order
    return Engine(name, path, batch_size, num_cores, impl, names, None, describe)
