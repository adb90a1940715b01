"""What every sift CLI shares: error handling, exit codes, and output bookkeeping.

Exit codes: 0 success; 1 a check failed (sift-check, an export that fails verification:
`VerificationFailed`, a file written but not for DeepSparse) or an internal error; 2 bad input
(any other `SiftError`), with one line on stderr. ``--verbose`` adds the traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import traceback
import warnings
from typing import Callable, Iterator, List, Optional, Sequence

from ..config import validate_sparsity
from ..errors import SiftError, SiftWarning, UserInputError
from ..exporters.checks import deepsparse_absence, runtimes_that_checked

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")


def sparsity_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"sparsity must be a number in (0, 1), got {text!r}") from None
    try:
        return validate_sparsity(value)
    except UserInputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def sparsity_list_arg(text: str) -> List[float]:
    return [sparsity_arg(part) for part in text.split(",") if part.strip()]


def run_main(prog: str, body: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
             argv: Optional[Sequence[str]]) -> int:
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format=f"{prog}: %(message)s")
    try:
        with one_line_warnings(prog):
            return body(args)
    except SiftError as e:
        if getattr(args, "verbose", False):
            traceback.print_exc()
        print(f"{prog}: error: {e}", file=sys.stderr)
        return getattr(e, "exit_status", 2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug in sift-compiler, not the user's input
        if getattr(args, "verbose", False):
            traceback.print_exc()
        print(f"{prog}: internal error: {type(e).__name__}: {e} (rerun with --verbose for the traceback)",
              file=sys.stderr)
        return 1


@contextlib.contextmanager
def one_line_warnings(prog: str) -> Iterator[None]:
    """Print each `SiftWarning` as one line, ``prog: warning: ...``; other warnings as usual."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", SiftWarning)
        default = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, SiftWarning):
                print(f"{prog}: warning: {message}", file=sys.stderr, flush=True)
            else:
                default(message, category, filename, lineno, file, line)
        warnings.showwarning = show
        yield


@contextlib.contextmanager
def all_or_nothing() -> Iterator[List[str]]:
    """Collect the paths a command writes; if it fails, remove them all."""
    written: List[str] = []
    try:
        yield written
    except BaseException:
        for path in written:
            with contextlib.suppress(OSError):
                os.remove(path)
        raise


def deepsparse_absent_line(verification) -> str:
    """One line when DeepSparse could not check a file here (why, and which runtimes did), else ''."""
    reason = deepsparse_absence(verification)
    if not reason:
        return ""
    others = runtimes_that_checked(verification)
    return (f"DeepSparse was not there ({reason}); checked on {' and '.join(others) or 'no other runtime'} "
            "instead")
