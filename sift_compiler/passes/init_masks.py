"""Draw exact-count random masks for every masked layer at its target density (`sparsity.init`),
then the first values of every new module, the way the model initialises its own
(`initialization`: the model's routine, else the layer type's default; one stream per layer)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from ..analyses.layers import LayerAnalysis
from ..analyses.shapes import ShapeAnalysis
from ..config import CompileConfig
from ..errors import UserInputError
from ..initialization import InitPolicy, LayerDefault, init_fresh_modules
from ..sparsity.init import init_masks
from .base import Pass, PassResult


@dataclass(frozen=True)
class InitOptions:
    """The seed every mask and new weight is drawn from (one stream per layer), and the N:M pattern
    of the masks (None: unstructured)."""

    seed: int = 0
    nm: Optional[Tuple[int, int]] = None

    @staticmethod
    def of(config: CompileConfig) -> "InitOptions":
        return InitOptions(config.seed, config.nm)


class InitMasksPass(Pass):
    """Draw the masks, then the new weights (see the module docstring)."""

    name = "init-masks"

    def __init__(self, options: InitOptions = InitOptions()) -> None:
        self.options = options

    def call(self, unit) -> PassResult:
        options = self.options
        if unit.on_meta and options.nm is not None:  # materialize() draws unstructured masks: refuse, not mislead
            raise UserInputError(f"pattern {options.nm[0]}:{options.nm[1]} is not supported on the meta device "
                                 "(sift.materialize draws unstructured masks): compile on a real device")
        if unit.on_meta:  # nothing to draw into: the masks and weights come with materialize()
            unit.notes.append("meta device: masks and new weights are planned, not drawn; sift.materialize(module, "
                              "device, seed) draws them from their (seed, layer) streams")
            return PassResult(False, frozenset({ShapeAnalysis, LayerAnalysis}))
        policy = unit.init_policy or LayerDefault()
        seed = options.seed
        # the layer default is init_masks' own draw, which can run on threads; a model's own init may not
        own_init = type(policy).draw_masked is not InitPolicy.draw_masked
        drawn = init_masks(unit.module, seed, draw_weights=(lambda layer, name: policy.draw_masked(layer, name, seed))
                           if own_init else None, nm=options.nm)
        redrawn = init_fresh_modules(unit.module, policy, seed)
        if drawn or redrawn:
            unit.touch()
        return PassResult(bool(drawn or redrawn), frozenset({ShapeAnalysis, LayerAnalysis}))
