"""Masks: masked layers, exact-count initialisation and the training engine.

``masks(module)`` -> ``{parameter name: bool mask}`` for every masked weight.
"""
from .init import exact_count, init_masks, random_mask
from .layers import (MaskedConv1d, MaskedConv2d, MaskedConv3d, MaskedLayer, MaskedLinear, iter_masked, masked_copy,
                     masks, new_layer, plain_copy)

__all__ = ["masks", "iter_masked", "MaskedLayer", "MaskedLinear", "MaskedConv1d", "MaskedConv2d", "MaskedConv3d",
           "new_layer", "masked_copy", "plain_copy", "init_masks", "random_mask", "exact_count"]
