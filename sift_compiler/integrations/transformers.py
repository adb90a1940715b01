"""Hugging Face `Trainer`: train a compiled model's masks with Static, SET or RigL.

::

    result = sift.compile(model, "wide", 0.75, example_kwargs={"input_ids": ids})   # a LlamaForCausalLM
    trainer = Trainer(model=result.module, args=args, train_dataset=data,
                      callbacks=[SparsityCallback(method="rigl")])
    trainer.train()

What the callback does, at each Trainer event:

- ``on_train_begin``: builds the engine (`sparsity.make_engine`) on the model and the optimizer
  Trainer built (accelerate's wrapper unwrapped); ``total_steps`` defaults to the Trainer's planned
  optimizer steps (``state.max_steps``); keyword options (``update_interval``, ``drop_fraction``,
  ``end_fraction``, ``pattern``, ``n``, ``m``, ``seed``) go to the engine. Resuming from a
  checkpoint, it reloads the engine state saved there (masks themselves come back with the
  model's weights, which Trainer restores).
- backward: gradients at inactive positions are masked as they are computed, so Trainer's
  gradient clipping (``max_grad_norm``) sees the sparse gradient, on every micro-batch of a
  gradient-accumulation step; RigL's dense gradient is summed on the side (``sparsity.layers``).
- ``on_optimizer_step`` (after ``optimizer.step()``, before ``zero_grad``): ``engine.step()``:
  exact per-layer counts, mask updates on the schedule, grown weights and their optimizer
  state at zero.
- ``on_save``: writes the engine state next to the checkpoint (``sift_sparsity.pt``, plain
  tensors and numbers, read back with ``weights_only=True``).
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch

from ..errors import UserInputError
from ..io import atomic_path, load_weights_only
from ..sparsity.engine import MaskEngine
from ..sparsity.engines import ENGINE_METHODS, make_engine

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - the extra is not installed
    raise ImportError("sift_compiler.integrations.transformers needs transformers: "
                      "pip install 'sift-compiler[transformers]'") from e

STATE_FILE = "sift_sparsity.pt"


class SparsityCallback(TrainerCallback):
    """Keeps the masks of a compiled model exact and evolving while a Hugging Face Trainer trains it.

    ``method``: "static", "set" or "rigl"; ``total_steps``: optimizer steps of the schedule
    (default: the Trainer's ``max_steps``); other keywords go to the engine (e.g.
    ``update_interval=100``). The engine is ``callback.engine`` once training has begun.
    """

    def __init__(self, method: str = "rigl", total_steps: Optional[int] = None, **options: Any) -> None:
        if method not in ENGINE_METHODS:
            raise UserInputError(f"unknown sparse training method {method!r}: choose one of {', '.join(ENGINE_METHODS)}")
        self.method, self.total_steps, self.options = method, total_steps, options
        self.engine: Optional[MaskEngine] = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or optimizer is None:
            raise UserInputError("SparsityCallback needs the Trainer's model and optimizer at on_train_begin")
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
        total = self.total_steps if self.total_steps is not None else state.max_steps
        if self.engine is not None:
            self.engine.remove()
        self.engine = make_engine(self.method, model, optimizer, total if self.method != "static" else None,
                                  **self.options)
        if state.global_step:
            self._resume(args, state)

    def _resume(self, args, state) -> None:
        """Resuming at ``state.global_step``: the engine state saved with that checkpoint, or (a
        checkpoint saved elsewhere) the step alone; the masks are in the weights Trainer loaded."""
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
        if os.path.isfile(path):
            self.engine.load_state_dict(load_weights_only(
                path, "sparse training state {path!r} does not exist",
                "cannot read the sparse training state {path!r}: {reason}; delete it to resume with the masks alone"))
            return
        saved = self.engine.state_dict()
        saved["step"] = state.global_step
        self.engine.load_state_dict(saved)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.engine.step()

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if self.engine is not None and os.path.isdir(folder) and args.should_save:
            with atomic_path(os.path.join(folder, STATE_FILE)) as tmp:
                torch.save(self.engine.state_dict(), tmp)

    def on_train_end(self, args, state, control, **kwargs):
        if self.engine is not None:
            self.engine.remove()  # the layers compute W * M again, as outside training
