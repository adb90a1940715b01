"""Small helpers over `nn.Module` trees that every layer uses: a submodule by path or None, eval
mode that gives every submodule its own training flag back, and training flags copied by path."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch.nn as nn


def submodule_or_none(root: Optional[nn.Module], path: Optional[str]) -> Optional[nn.Module]:
    """``root.get_submodule(path)``, or None where there is no such module (or no root or path)."""
    if root is None or path is None:
        return None
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Run ``module`` in eval mode, then give every submodule its own training flag back (not the
    root's to all: a frozen BatchNorm in a training model stays frozen)."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, flag in flags:
            m.training = flag


def follow_training_flags(target: nn.Module, source: nn.Module) -> None:
    """Give every submodule of ``target`` the training flag of ``source``'s module at the same path,
    and the root's where ``source`` has none there (a graph's containers, modules made from
    functional ops): a graph captured from a model keeps a frozen BatchNorm frozen."""
    flags = {path: m.training for path, m in source.named_modules()}
    for path, m in target.named_modules():
        m.training = flags.get(path, source.training)
