"""Lightning `Trainer`: train a compiled model's masks with Static, SET or RigL.

::

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = sift.compile(model, "parallel", 0.75, (x,)).module
        ...
    trainer = lightning.Trainer(max_steps=1000, callbacks=[SparsityCallback(method="rigl")])

- ``on_train_start`` (after Lightning built the optimizer and restored any checkpoint): builds
  the engine on the LightningModule and its (first) optimizer; ``total_steps`` defaults to
  ``trainer.estimated_stepping_batches``; keyword options go to the engine.
- ``on_before_optimizer_step`` (Lightning calls it after the gradients of all accumulated
  batches are in and before it clips them): ``engine.mask_gradients()``, so clipping sees the
  sparse gradient (in eager mode they are masked already; compiled models need this call).
- after each real ``optimizer.step()`` (a step hook on the optimizer, so gradient accumulation
  and skipped AMP steps count right): ``engine.step()``.
- ``state_dict``/``load_state_dict``: the engine state travels in Lightning checkpoints.

Install Lightning with ``pip install 'sift-compiler[lightning]'``.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from ..errors import UserInputError
from ..sparsity.engine import MaskEngine
from ..sparsity.engines import ENGINE_METHODS, make_engine

try:
    from lightning.pytorch import Callback
except ImportError as e:  # pragma: no cover - the extra is not installed
    raise ImportError("sift_compiler.integrations.lightning needs Lightning: pip install 'sift-compiler[lightning]'") from e


class SparsityCallback(Callback):
    """Keeps the masks of a compiled model exact and evolving while Lightning trains it.

    ``method``: "static", "set" or "rigl"; ``total_steps``: optimizer steps of the schedule
    (default: ``trainer.estimated_stepping_batches``); other keywords go to the engine.
    """

    def __init__(self, method: str = "rigl", total_steps: Optional[int] = None, **options: Any) -> None:
        if method not in ENGINE_METHODS:
            raise UserInputError(f"unknown sparse training method {method!r}: choose one of {', '.join(ENGINE_METHODS)}")
        self.method, self.total_steps, self.options = method, total_steps, options
        self.engine: Optional[MaskEngine] = None
        self._saved: Optional[Dict[str, Any]] = None  # engine state from a checkpoint, until the engine exists
        self._hook = None

    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.optimizers:
            raise UserInputError("SparsityCallback needs an optimizer: configure_optimizers returned none")
        optimizer = trainer.optimizers[0]
        total = self.total_steps if self.total_steps is not None else int(trainer.estimated_stepping_batches)
        self._detach()
        self.engine = make_engine(self.method, pl_module, optimizer, total if self.method != "static" else None,
                                  **self.options)
        if self._saved is not None:
            self.engine.load_state_dict(self._saved)
            self._saved = None
        self._hook = optimizer.register_step_post_hook(lambda *_: self.engine.step())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.engine is not None:
            self.engine.mask_gradients()

    def on_train_end(self, trainer, pl_module) -> None:
        self._detach()

    def _detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.engine is not None:
            self.engine.remove()

    def state_dict(self) -> Dict[str, Any]:
        if self.engine is not None:
            return {"engine": self.engine.state_dict()}
        return {"engine": self._saved} if self._saved is not None else {}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._saved = state_dict.get("engine")
