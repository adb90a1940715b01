"""DeepSparse in a child process: a native abort, a hang or an out-of-memory kill there is one line here.

DeepSparse 1.8 is a closed native library. On some graphs its compiler dies with an assertion
(``Assertion at ./src/include/wand/engine/compute/planner.hpp:70``), a page of backtrace and
``abort()``, which would take the calling process with it. So sift never loads it in-process:
`DeepSparseWorker` starts this file as a child (``python deepsparse_worker.py``; run by path, so
the child imports neither torch nor sift_compiler, only numpy, onnx and deepsparse), and speaks a
request/response protocol over its stdin/stdout: length-prefixed pickles of plain dicts and numpy
arrays, written and read only by this file's own code.

    parent                                  child (this file as __main__)
    {"op": "compile", path, batch, ...} ->  deepsparse.Engine(...)   <- {"ok", inputs, fraction, ...}
    {"op": "run", feeds}                ->  engine.run(...)          <- {"ok", outputs}
    {"op": "time", feeds, warmup, n}    ->  timed loop, in the child <- {"ok", latencies_ms}

Timing loops run in the child, so pickling the inputs costs nothing in the latencies. The child's
stdout is moved to its stderr before DeepSparse loads (its banner and native prints must not mix
with the protocol), and its stderr goes to a temporary log file that the parent reads only when
the child dies: `WorkerCrash` then carries one line (the assertion's location, or the signal),
and the full log goes to the ``sift_compiler.deepsparse`` logger (shown by the CLIs' ``--verbose``).
Every request has a time limit; a child that does not answer in time is killed.

A worker can serve many files in turn (``compile`` replaces its engine, ``release`` drops it), so
DeepSparse is imported once per worker, not once per file: `runtimes` keeps one idle worker.

>>> with DeepSparseWorker() as worker:
...     info = worker.request("compile", path="m.onnx", batch_size=16, num_cores=None, input_shapes=None)
...     outputs = worker.request("run", feeds={"input": x})["outputs"]
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # run by path: this folder holds onnx.py, which must not shadow the onnx package
    _HERE = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import contextlib  # noqa: E402
import gc  # noqa: E402
import logging  # noqa: E402
import pickle  # noqa: E402
import select  # noqa: E402
import signal  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import weakref  # noqa: E402
from typing import Any, Dict, Optional  # noqa: E402

import numpy as np  # noqa: E402

DEFAULT_TIMEOUT_S = 600.0   # per request: compiling a large model at batch 64 on 2 cores takes minutes
_HEADER = struct.Struct("<Q")
log = logging.getLogger("sift_compiler.deepsparse")


# ---------------------------------------------------------------------------------------------
# The protocol: one frame = 8-byte little-endian length + pickle


def _write_frame(stream, message: Dict[str, Any]) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _read_exactly(stream, size: int) -> Optional[bytes]:
    chunks, left = [], size
    while left:
        chunk = stream.read(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------------------------------------
# The child


def _needs_fixed_shapes(path: str, batch_size: int, input_shapes) -> bool:
    """Whether some input has a symbolic dim besides the batch, or a static one the shapes change."""
    if not input_shapes:
        return False
    import onnx  # lazy: sift_compiler loads this module (runtimes imports it); onnx takes 0.2 s to import
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
def _private_static_copy(path: str, input_shapes):
    """A temporary copy of ``path`` with every input dim fixed to ``input_shapes``.

    DeepSparse's own ``input_shapes`` option REWRITES THE USER'S FILE in place (deepsparse 1.8,
    ``override_onnx_input_shapes(inplace=True)``): sift must never let it touch the file it checks.
    """
    import onnx  # lazy (see _needs_fixed_shapes)
    model = onnx.load(path)
    inits = {i.name for i in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in inits]
    for value, shape in zip(inputs, input_shapes):
        for dim, size in zip(value.type.tensor_type.shape.dim, shape):
            dim.Clear()
            dim.dim_value = int(size)
    with tempfile.TemporaryDirectory(prefix="sift-ds-") as tmp:
        target = os.path.join(tmp, "model.onnx")
        large = model.ByteSize() > 2 ** 31 - 2 ** 26
        onnx.save_model(model, target, save_as_external_data=large, all_tensors_to_one_file=True,
                        location="model.onnx.data" if large else None)
        del model
        yield target


class _Child:
    """The request handlers; one compiled engine at a time."""

    def __init__(self) -> None:
        self.engine = None

    def probe(self) -> Dict[str, Any]:
        import deepsparse  # optional, and only ever in the child process (module docstring)
        return {"version": deepsparse.__version__}

    def release(self) -> Dict[str, Any]:
        self.engine = None
        gc.collect()
        return {}

    def compile(self, path: str, batch_size: int, num_cores: Optional[int], input_shapes) -> Dict[str, Any]:
        import deepsparse  # optional, child process only
        self.release()
        if _needs_fixed_shapes(path, batch_size, input_shapes):
            with _private_static_copy(path, input_shapes) as copy:
                self.engine = deepsparse.Engine(copy, batch_size=batch_size, num_cores=num_cores)
        else:  # only the batch is dynamic: DeepSparse sets it itself without writing any file
            self.engine = deepsparse.Engine(path, batch_size=batch_size, num_cores=num_cores)
        e = self.engine
        return {"input_names": list(e.input_names), "fraction_of_supported_ops": float(e.fraction_of_supported_ops),
                "description": f"DeepSparse {deepsparse.__version__} ({e.cpu_avx_type}"
                               f"{', VNNI' if e.cpu_vnni else ''}, {e.num_cores} cores)"}

    def _inputs(self, feeds):
        # unpickled arrays carry an explicit byte order ('<f4'), which DeepSparse calls an unsupported type
        return [np.ascontiguousarray(feeds[name], dtype=np.dtype(feeds[name].dtype.type))
                for name in self.engine.input_names]

    def run(self, feeds) -> Dict[str, Any]:
        return {"outputs": self.engine.run(self._inputs(feeds), val_inp=False)}

    def time(self, feeds, warmup: int, iterations: int) -> Dict[str, Any]:
        inputs = self._inputs(feeds)
        for _ in range(warmup):
            self.engine.run(inputs, val_inp=False)
        latencies = []
        for _ in range(iterations):
            start = time.perf_counter()
            self.engine.run(inputs, val_inp=False)
            latencies.append((time.perf_counter() - start) * 1000.0)
        return {"latencies_ms": latencies}


def _child_main() -> int:
    os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
    requests = sys.stdin.buffer
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # native prints (DeepSparse's banner) go to the log, never into the protocol
    sys.stdout = sys.stderr
    child = _Child()
    while True:
        header = _read_exactly(requests, _HEADER.size)
        if header is None:
            return 0
        request = pickle.loads(_read_exactly(requests, _HEADER.unpack(header)[0]) or b"")
        op = request.pop("op")
        try:
            reply = dict(getattr(child, op)(**request), ok=True)
        except Exception as e:  # a Python-level refusal: the child lives on, the parent gets the reason
            lines = str(e).strip().splitlines()
            reply = {"ok": False, "error": f"{type(e).__name__}: {lines[-1] if lines else ''}".rstrip(": ")}
        _write_frame(replies, reply)


# ---------------------------------------------------------------------------------------------
# The parent


class WorkerError(RuntimeError):
    """DeepSparse refused a request (a Python exception in the child, which lives on)."""


class WorkerCrash(WorkerError):
    """The child died (native abort, signal) or did not answer in time; ``str()`` is one line."""

    def __init__(self, message: str, log_text: str = "") -> None:
        super().__init__(message)
        self.log_text = log_text


def crash_reason(returncode: int, log_text: str) -> str:
    """One line for a dead child: the native assertion's location, or the signal, or the last log line."""
    assertion = next((line.strip() for line in log_text.splitlines() if line.strip().startswith("Assertion at")),
                     "")
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        if assertion:
            return f"DeepSparse aborted ({name}): {assertion}"
        if -returncode == signal.SIGKILL:
            return f"DeepSparse worker killed by signal {-returncode} ({name}; out of memory?)"
        return f"DeepSparse worker killed by signal {-returncode} ({name})"
    if assertion:
        return f"DeepSparse aborted (exit status {returncode}): {assertion}"
    last = next((line.strip() for line in reversed(log_text.splitlines()) if line.strip()), "no message")
    return f"DeepSparse worker exited with status {returncode}: {last[:300]}"


class DeepSparseWorker:
    """A child process that owns one DeepSparse engine; see the module docstring."""

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        fd, self._log_path = tempfile.mkstemp(prefix="sift-deepsparse-", suffix=".log")
        env = dict(os.environ, NM_DISABLE_ANALYTICS="1")
        try:
            self._proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=fd, env=env, start_new_session=True)
        finally:
            os.close(fd)  # the child has its own copy
        self._finalizer = weakref.finalize(self, _shutdown, self._proc, self._log_path)
        self.dead: Optional[str] = None   # why the child is gone, once it is

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def alive(self) -> bool:
        return not self.dead and self._proc.poll() is None

    def request(self, op: str, timeout_s: Optional[float] = None, **arguments) -> Dict[str, Any]:
        """Send one request and wait for its reply; `WorkerError` if refused, `WorkerCrash` if the child died."""
        if self.dead:
            raise WorkerCrash(self.dead)
        limit = self.timeout_s if timeout_s is None else timeout_s
        try:
            _write_frame(self._proc.stdin, dict(arguments, op=op))
            reply = self._read_reply(limit, op)
        except (BrokenPipeError, EOFError):
            raise self._crashed() from None
        if not reply.get("ok"):
            raise WorkerError(reply.get("error", "unknown error"))
        return reply

    def _read_reply(self, limit: float, op: str) -> Dict[str, Any]:
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + limit
        buffer = bytearray()
        needed = _HEADER.size
        have_header = False
        while len(buffer) < needed:
            left = deadline - time.monotonic()
            ready = select.select([fd], [], [], max(0.0, left))[0] if left > 0 else []
            if not ready:
                self._kill()
                self.dead = f"no answer from DeepSparse within {limit:g} s ({op}); worker killed"
                raise WorkerCrash(self.dead, self._log_text())
            chunk = os.read(fd, max(65536, needed - len(buffer)))
            if not chunk:
                raise EOFError
            buffer += chunk
            if not have_header and len(buffer) >= _HEADER.size:
                needed = _HEADER.size + _HEADER.unpack(bytes(buffer[:_HEADER.size]))[0]
                have_header = True
        return pickle.loads(bytes(buffer[_HEADER.size:needed]))

    def _log_text(self) -> str:
        try:
            with open(self._log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def _crashed(self) -> WorkerCrash:
        try:
            returncode = self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._kill()
            returncode = self._proc.wait()
        text = self._log_text()
        self.dead = crash_reason(returncode, text)
        log.info("DeepSparse worker %d died: %s; its log:\n%s", self._proc.pid, self.dead, text)
        return WorkerCrash(self.dead, text)

    def _kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            self._proc.wait(timeout=30)

    def close(self) -> None:
        """End the child (closing its stdin ends its loop) and delete its log."""
        self._finalizer()

    def __enter__(self) -> "DeepSparseWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _shutdown(proc: subprocess.Popen, log_path: str) -> None:
    with contextlib.suppress(Exception):
        proc.stdin.close()
    try:
        proc.wait(timeout=10)
    except Exception:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            proc.wait(timeout=10)
    with contextlib.suppress(Exception):
        proc.stdout.close()
    with contextlib.suppress(OSError):
        os.remove(log_path)


if __name__ == "__main__":
    sys.exit(_child_main())
