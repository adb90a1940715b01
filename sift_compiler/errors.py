"""The error tree of sift-compiler.

Every error that is about a place in the user's model names that place: the node, its op and
target, and the user's source line when FX recorded one. The CLI turns any `SiftError` into one
line on stderr and exit code 2; tracebacks only appear with ``--verbose``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch.fx as fx


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of ``error``'s message, at most ``limit`` characters ("" for an empty message).

    For one-line error reports that quote a library's error, which may be empty or span pages.
    """
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else ""


class SiftError(Exception):
    """Base class for every error sift-compiler raises on purpose."""


class UserInputError(SiftError, ValueError):
    """A bad argument: a sparsity out of range, an unknown transform, a missing file..."""


class ModelLoadError(SiftError):
    """A model source that cannot be turned into an nn.Module (missing, corrupt, refused pickle)."""


class CaptureError(SiftError):
    """The model could not be captured as a graph (torch.fx and torch.export both failed)."""


class PassError(SiftError):
    """A pass failed; the message names the pass, the node and the passes that ran before it."""


class PreconditionError(PassError):
    """A pass was run on a unit that does not satisfy what the pass requires."""


class PostconditionError(PassError):
    """A pass produced a unit that breaks one of its invariants (iso-FLOP, masks, shapes)."""


class UnsupportedOpError(SiftError):
    """The graph holds an op that an analysis does not understand and cannot safely ignore."""


class ExportError(SiftError):
    """ONNX export or its verification failed."""


class VerificationFailed(ExportError):
    """An exported file failed a check and was not written: the CLIs exit 1 (a failed check), not 2."""

    exit_status = 1
class ShortfallError(SiftError):
    """With ``strict=True``: the transform could not be applied as asked (see `shortfall`)."""


class SiftWarning(UserWarning):
    """A transform not applied as asked (see `shortfall`); the CLI prints it as one line."""


def describe_node(node: fx.Node) -> str:
    """`'layer1.0.conv1' (call_module Conv2d)` plus the user's source line when FX kept it."""
    what = node.op
    if node.op == "call_module":
        try:
            module = node.graph.owning_module.get_submodule(str(node.target))
            what = f"call_module {type(module).__name__}"
        except (AttributeError, TypeError):
            pass
    elif node.op == "call_function":
        what = f"call_function {getattr(node.target, '__name__', node.target)}"
    text = f"'{node.target if node.op == 'call_module' else node.name}' ({what})"
    location = source_location(node)
    return f"{text} at {location}" if location else text


def source_location(node: fx.Node) -> Optional[str]:
    """The innermost frame of the node's stack trace outside torch and sift, as 'file:line in function'."""
    trace = node.meta.get("stack_trace") if hasattr(node, "meta") else None
    if not trace:
        return None
    frames = [line.strip() for line in trace.strip().splitlines() if line.strip().startswith("File ")]
    if not frames:
        return None
    user = [f for f in frames if "/torch/" not in f and "/sift_compiler/" not in f]
    # 'File "x.py", line 12, in forward'
    last = (user or frames)[-1]
    return last.replace('File "', "").replace('", line ', ":").replace(", in ", " in ")


def pass_error(pass_name: str, node: Optional[fx.Node], reason: str,
               history: Sequence[str] = (), cls: type = PassError) -> PassError:
    """Build a PassError that says which pass, where, why, and what ran before."""
    error = cls(_in_pass(pass_name, node, reason, history))
    _mark(error, pass_name, history, node)
    return error


def at_node(error: BaseException, node: fx.Node) -> BaseException:
    """Record on ``error`` the graph node a pass was working on when it was raised (innermost wins).

    The pass manager names that node, with its source line, in the message the user sees.
    """
    if getattr(error, "sift_node", None) is None:
        error.sift_node = node
    return error


def add_pass_context(error: SiftError, pass_name: str, history: Sequence[str]) -> SiftError:
    """Put the pass, the node (see `at_node`) and the passes before it into ``error``'s message, in place.

    The error keeps its class (a `UserInputError` raised inside a pass is still one, and the CLI
    exit code stays the class's), so the context goes into its message and its attributes
    ``pass_name``, ``pass_history`` and ``sift_node``. An error that already names its pass is
    left as it is.
    """
    if getattr(error, "pass_name", None) is not None:
        return error
    reason = str(error.args[0]) if error.args else type(error).__name__
    prefix = f"[{pass_name}] "
    message = _in_pass(pass_name, getattr(error, "sift_node", None), reason[len(prefix):]
                       if reason.startswith(prefix) else reason, history)
    error.args = (message,) + tuple(error.args[1:])
    _mark(error, pass_name, history, getattr(error, "sift_node", None))
    return error


def _in_pass(pass_name: str, node: Optional[fx.Node], reason: str, history: Sequence[str]) -> str:
    where = f" at {describe_node(node)}" if node is not None else ""
    after = f"; after passes {list(history)}" if history else "; it was the first pass"
    return f"[{pass_name}] {reason}{where}{after}"


def _mark(error: BaseException, pass_name: str, history: Sequence[str], node: Optional[fx.Node]) -> None:
    error.pass_name = pass_name
    error.pass_history = list(history)
    error.sift_node = node
