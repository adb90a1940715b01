"""FSDP2 and distributed checkpoints for compiled models: sharded masks, any world size.

::

    import sift_compiler.distributed as sd

    model = sift.compile(LlamaForCausalLM(config), "wide", 0.75, example_kwargs={"input_ids": ids}).module
    sd.fully_shard_model(model)                # fully_shard every decoder block, then the root
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    masks = sift.sparsity.RigL(model, opt, total_steps)
    ...                                         # the usual loop: backward, opt.step(), masks.step()
    sd.save_checkpoint("ckpt/step-1000", model, opt, masks)    # on every rank
    sd.load_checkpoint("ckpt/step-1000", model, opt, masks)    # on every rank, any world size (1 too)

A mask is a bool parameter (never trained), so ``torch.distributed.fsdp.fully_shard`` shards it
with its weight: each rank holds 1/world of every mask. `fully_shard_model` is a convenience;
calling ``fully_shard`` yourself works the same (the mask engine notices the sharding). What the
engine does on shards: ``sparsity/shards.py`` and ``sparsity/topk.py``; docs/training.md, "FSDP2
and distributed checkpoints".

Checkpoints are ``torch.distributed.checkpoint`` (DCP) directories holding three entries:
``model`` and ``optimizer`` (``get_state_dict``: weights, masks, optimizer state, sharded as the
run was) and ``sift`` (the engine's step, pending update, configuration and history as one JSON
string; its masks are the model's). DCP reshards on load, so a run saved on 2 ranks resumes on 1
or on 4, and a single-process run resumes sharded.
"""
from __future__ import annotations

import json
from typing import Iterable, Optional

import torch
import torch.nn as nn

from .errors import UserInputError
from .sparsity.engine import MaskEngine
from .sparsity.layers import forget_float_masks, iter_masked
from .sparsity.shards import is_dtensor

ENGINE_KEY = "sift"


def fully_shard_model(model: nn.Module, blocks: Optional[Iterable[nn.Module]] = None, **fsdp_options) -> nn.Module:
    """``fully_shard`` each block of ``model``, then ``model`` itself; returns ``model``.

    ``blocks`` defaults to the modules of a Hugging Face model's ``_no_split_modules`` classes
    (its decoder layers); ``fsdp_options`` go to every ``fully_shard`` call (``mesh``,
    ``reshard_after_forward``, ``mp_policy``, ...).
    """
    from torch.distributed.fsdp import fully_shard
    if blocks is None:
        kinds = set(getattr(model, "_no_split_modules", None) or ())
        blocks = [m for m in model.modules() if type(m).__name__ in kinds and m is not model]
        if not blocks:
            raise UserInputError(f"{type(model).__name__} names no blocks to shard (no _no_split_modules): pass "
                                 f"blocks=, e.g. fully_shard_model(model, blocks=model.layers)")
    for block in blocks:
        fully_shard(block, **fsdp_options)
    fully_shard(model, **fsdp_options)
    mark_sharded(model)
    return model


def mark_sharded(model: nn.Module) -> int:
    """Tell the masked layers whose masks FSDP2 shards that they are sharded; returns how many.

    A mask engine does this by itself. Call it after your own ``fully_shard`` calls when the
    model runs without an engine (evaluation, inference): a sharded layer keeps no float copy
    of its mask (see ``sparsity/layers.py``).
    """
    count = 0
    for _, layer in iter_masked(model):
        if is_dtensor(layer.weight_mask):
            layer.sharded = True
            count += 1
    if count:
        forget_float_masks()
    return count


def save_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                    engine: Optional[MaskEngine] = None) -> None:
    """Save weights, masks, optimizer state and the engine's state to the DCP directory ``path``.

    Call it on every rank (it is a collective when a process group is initialised). Call it
    between steps: after ``engine.step()``, so that the weights are exactly sparse.
    """
    from torch.distributed.checkpoint import save
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    if engine is not None:
        state[ENGINE_KEY] = {"engine": json.dumps(engine.state_dict(masks=False))}
    save(state, checkpoint_id=path)


def load_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                    engine: Optional[MaskEngine] = None) -> None:
    """Load what `save_checkpoint` wrote into ``model``, ``optimizer`` and ``engine``, in place.

    The model is built and sharded (or not) as this run wants, the optimizer and the engine are
    made from it as for a fresh run; then every rank calls this. The world size may differ from
    the saving run's. The engine checks that its configuration matches the saved one and that
    every mask has its exact count.
    """
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_state, optim_state = get_state_dict(model, optimizer)  # also creates the optimizer's state
    state = {"model": model_state, "optimizer": optim_state}
    if engine is not None:
        state[ENGINE_KEY] = {"engine": ""}
    load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    mark_sharded(model)
    if engine is not None:
        saved = state[ENGINE_KEY]["engine"]
        if not saved:
            raise UserInputError(f"{path} holds no mask-engine state: it was saved without an engine")
        engine.load_state_dict(json.loads(saved))
