"""Checkpoints of a mask engine: its state as plain data, and loading it back exactly.

``engine.state_dict()`` holds the step, a pending update, the configuration, the history and the
masks; ``state_dict(masks=False)`` leaves the masks out for checkpoints that keep them with the
model's weights (`sift_compiler.distributed.save_checkpoint`: the masks are sharded parameters
there). Loading checks the configuration and the exact per-layer counts.
"""
from __future__ import annotations

from typing import Any, Dict

import torch

from ..errors import UserInputError
from .shards import is_dtensor, local, local_rows

STATE_VERSION = 1


class EngineCheckpoint:
    """Mixin of `MaskEngine`: ``state_dict`` / ``load_state_dict``."""

    def _config(self) -> Dict[str, Any]:
        sched = self.schedule
        return {"method": self.method, "pattern": self.pattern, "n": self.n, "m": self.m, "seed": self.seed,
                "total_steps": sched.total_steps if sched else None,
                "update_interval": sched.update_interval if sched else None,
                "drop_fraction": sched.drop_fraction if sched else None,
                "end_fraction": sched.end_fraction if sched else None}

    def state_dict(self, masks: bool = True) -> Dict[str, Any]:
        """Everything needed to resume exactly: step, pending update, masks (plain data).

        ``masks=False`` leaves the masks out, for checkpoints that hold them with the model's
        weights anyway (`sift_compiler.distributed.save_checkpoint`).
        """
        state = {"version": STATE_VERSION, "config": self._config(), "step": self.step_count,
                 "update_due": self.update_due, "history": [dict(h) for h in self.history]}
        if masks:
            state["masks"] = {w.name: w.layer.weight_mask.detach().cpu().clone() for w in self.weights}
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a `state_dict`; the masks are installed (weights at inactive positions zeroed).

        A state without masks (``state_dict(masks=False)``) keeps the module's masks, which must
        then have the exact counts (they were loaded with the module's state dict)."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise UserInputError("not a mask-engine state dict (version "
                                 f"{state.get('version') if isinstance(state, dict) else '?'}, expected {STATE_VERSION})")
        mine, theirs = self._config(), state["config"]
        differ = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if differ:
            what = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in differ.items())
            raise UserInputError(f"the saved mask engine was configured differently ({what})")
        if "masks" in state:
            names = {w.name for w in self.weights}
            if set(state["masks"]) != names:
                raise UserInputError(f"saved masks name other weights: missing {sorted(names - set(state['masks']))}, "
                                     f"unexpected {sorted(set(state['masks']) - names)}")
            for w in self.weights:
                saved = state["masks"][w.name]
                saved = local(saved) if is_dtensor(saved) else local_rows(saved, w.shard)
                w.install(saved.to(device=w.local_param.device, dtype=torch.bool))
        wrong = [f"{w.name} ({actual}, not {w.count})"
                 for w, actual in zip(self.weights, self.global_counts(self.weights)) if actual != w.count]
        if wrong:
            raise UserInputError("after loading, these masks do not have the engine's exact counts: " + ", ".join(wrong))
        self.step_count = int(state["step"])
        self.update_due = bool(state["update_due"])
        self.history = [dict(h) for h in state.get("history", [])]
        self.optimizer_stepped = False  # e.g. torch.distributed.checkpoint stepped the optimizer to build its state
        self.dense_grads.clear()
        self._local_dense_grads.clear()
        self.apply_masks()
        self._set_dense_grad(self._wants_dense_grad(self.step_count + 1))

