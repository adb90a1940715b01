"""Masks: masked layers, exact-count initialisation and the training engine.

``masks(module)`` -> ``{parameter name: bool mask}`` for every masked weight.

>>> masks = sift_compiler.sparsity.RigL(result.module, optimizer, total_steps)   # or SET, Static
>>> ...; optimizer.step(); masks.step(); optimizer.zero_grad()
"""
from .counts import ParameterCount, count_parameters
from .init import exact_count, init_masks, random_mask
from .engine import MaskEngine
from .engines import ENGINE_METHODS, make_engine
from .evolution import SET
from .layers import (MaskedConv1d, MaskedConv2d, MaskedConv3d, MaskedLayer, MaskedLinear, iter_masked, masked_copy,
                     masks, new_layer, plain_copy)
from .nm import is_transposable_nm, random_nm_mask
from .rigl import RigL
from .schedules import UpdateSchedule
from .static import Static

__all__ = ["masks", "iter_masked", "MaskedLayer", "MaskedLinear", "MaskedConv1d", "MaskedConv2d", "MaskedConv3d",
           "new_layer", "masked_copy", "plain_copy", "init_masks", "random_mask", "exact_count", "MaskEngine", "make_engine", "ENGINE_METHODS", "RigL",
           "SET", "Static", "UpdateSchedule", "is_transposable_nm", "random_nm_mask", "count_parameters", "ParameterCount"]
