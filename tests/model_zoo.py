"""Real architectures with random weights and small inputs, shared by the transform tests."""
from __future__ import annotations

from typing import Any, Callable, Dict, NamedTuple, Tuple

import torch
import torch.nn as nn

from sift_compiler.capture.sources import load_model


class Case(NamedTuple):
    model: nn.Module
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]


def _spec(spec: str, shape) -> Callable[[], Case]:
    def build() -> Case:
        source = load_model(spec, input_shape=shape)
        torch.manual_seed(0)
        return Case(source.module, source.args, source.kwargs)
    return build


# name -> builder; sizes chosen so the whole matrix fits the CI budget on 2 cores.
MODELS: Dict[str, Callable[[], Case]] = {
    "resnet18": _spec("torchvision:resnet18", (1, 3, 64, 64)),
    "resnet50": _spec("torchvision:resnet50", (1, 3, 64, 64)),
    "mobilenet_v2": _spec("torchvision:mobilenet_v2", (1, 3, 64, 64)),
    "densenet121": _spec("torchvision:densenet121", (1, 3, 64, 64)),
    "convnext_tiny": _spec("torchvision:convnext_tiny", (1, 3, 64, 64)),
    "vit_b_16": _spec("torchvision:vit_b_16,image_size=32", (1, 3, 32, 32)),
    "timm_convnext_atto": _spec("timm:convnext_atto", (1, 3, 64, 64)),
    "timm_vit_tiny": _spec("timm:vit_tiny_patch16_224,img_size=32", (1, 3, 32, 32)),
    "gpt2": _spec("transformers:gpt2,n_layer=2,n_embd=64,n_head=4,vocab_size=500,n_positions=64", (1, 16)),
    "llama": _spec("transformers:llama,num_hidden_layers=2,hidden_size=64,num_attention_heads=4,num_key_value_heads=2,"
                   "intermediate_size=128,vocab_size=500,max_position_embeddings=64", (1, 16)),
    "bert": _spec("transformers:bert,num_hidden_layers=2,hidden_size=64,num_attention_heads=4,"
                  "intermediate_size=128,vocab_size=500,max_position_embeddings=64", (1, 16)),
}
