"""Files appear whole or not at all: write to a temporary file beside the target, then rename."""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any, Iterator

import torch

from .errors import ModelLoadError, UserInputError, first_line


def load_weights_only(path: str, missing: str, unreadable: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: no code from the file runs. A file that is
    not there raises ModelLoadError(``missing``), one torch cannot read this way ModelLoadError(
    ``unreadable``); both are formatted with ``path`` and ``reason`` (the error's first line)."""
    if not os.path.exists(path):
        raise ModelLoadError(missing.format(path=path, reason=""))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(unreadable.format(path=path, reason=first_line(e))) from None


def check_writable(path: str, what: str = "output") -> None:
    """Fail early, before any work, if ``path`` cannot be written."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        raise UserInputError(f"{what} path {path!r} is a directory")
    if not os.path.isdir(directory):
        raise UserInputError(f"cannot write {what} {path!r}: directory {directory!r} does not exist")
    if not os.access(directory, os.W_OK):
        raise UserInputError(f"cannot write {what} {path!r}: directory {directory!r} is not writable")


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path in the target's directory; rename it to ``path`` on success.

    >>> with atomic_path("model.onnx") as tmp:
    ...     torch.onnx.export(model, x, tmp)
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
