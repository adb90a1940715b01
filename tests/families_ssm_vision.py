"""Tiny configs of the 2025-2026 families of issue 16: state-space and hybrid language models,
modern vision backbones and diffusion models, with random weights and small example inputs.

Each builder returns a `model_zoo.Case` (model in eval mode, args, kwargs); `FAMILIES` maps a
name to its builder, and `SLOW` lists those whose tests run one sparsity only. The support
matrix (benchmarks/support_matrix.py) and tests/test_families_ssm_vision.py both read them.
Diffusion builders need `diffusers` (the ``diffusion`` extra); `available(name)` says whether a
family's library is installed.
"""
from __future__ import annotations

import importlib.util
from typing import Callable, Dict

import torch

from model_zoo import Case

VOCAB, TOKENS = 96, 12


def _tokens(batch: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, TOKENS), generator=torch.Generator().manual_seed(0))


def mamba2() -> Case:
    """Mamba-2: in_proj -> [z | x B C | dt], depthwise causal conv1d, SSD scan over 4 heads x 16."""
    from transformers import Mamba2Config, Mamba2ForCausalLM
    torch.manual_seed(0)
    config = Mamba2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16,
                          expand=2, state_size=8, n_groups=1, conv_kernel=4, chunk_size=6,
                          tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return Case(Mamba2ForCausalLM(config).eval(), (), {"input_ids": _tokens()})


def bamba() -> Case:
    """Bamba: a hybrid of Mamba-2 mixers and grouped-query attention layers, each with a SwiGLU MLP."""
    from transformers import BambaConfig, BambaForCausalLM
    torch.manual_seed(0)
    config = BambaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_layer_indices=[1],
                         mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8, mamba_d_conv=4,
                         mamba_expand=2, mamba_chunk_size=6, max_position_embeddings=64)
    return Case(BambaForCausalLM(config).eval(), (), {"input_ids": _tokens()})


def _image(channels: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(0))


def dinov2_registers() -> Case:
    """DINOv2 with 4 register tokens and layer scale (transformers Dinov2WithRegisters), classifier
    on the class token and the mean patch token."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersForImageClassification
    torch.manual_seed(0)
    config = Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                                       image_size=16, patch_size=4, num_register_tokens=4, layerscale_value=1.0,
                                       num_labels=10)
    return Case(Dinov2WithRegistersForImageClassification(config).eval(), (_image(3, 16),), {})


def siglip_vision() -> Case:
    """SigLIP's vision tower (a ViT without a class token) with a classifier on the mean token."""
    from transformers import SiglipConfig, SiglipForImageClassification
    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                  patch_size=4)
    config = SiglipConfig(vision_config=vision, text_config=dict(hidden_size=32, intermediate_size=64,
                                                                 num_hidden_layers=1, num_attention_heads=4,
                                                                 vocab_size=VOCAB), num_labels=10)
    return Case(SiglipForImageClassification(config).eval(), (_image(3, 16),), {})


def convnextv2() -> Case:
    """ConvNeXt-V2 (transformers): depthwise 7x7, pointwise MLP with global response normalisation."""
    from transformers import ConvNextV2Config, ConvNextV2ForImageClassification
    torch.manual_seed(0)
    config = ConvNextV2Config(hidden_sizes=[64, 128], depths=[1, 1], num_stages=2, num_labels=10)
    return Case(ConvNextV2ForImageClassification(config).eval(), (_image(),), {})


def dit() -> Case:
    """A DiT (diffusers DiTTransformer2DModel): patch embedding, adaLN-Zero blocks modulated by the
    timestep and class embeddings."""
    from diffusers import DiTTransformer2DModel
    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=2,
                                  sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=1)
    _nonzero_adaln(model)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return Case(model.eval(), (latents,), {"timestep": torch.tensor([3]), "class_labels": torch.tensor([1]),
                                           "return_dict": False})


def unet() -> Case:
    """A UNet (diffusers UNet2DModel): ResNet blocks with time-embedding modulation, attention at
    the lowest resolution, skip concatenations."""
    from diffusers import UNet2DModel
    torch.manual_seed(0)
    model = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                        layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8)
    return Case(model.eval(), (_image(3, 16), torch.tensor([5])), {"return_dict": False})


def _nonzero_adaln(model: torch.nn.Module) -> None:
    """adaLN-Zero starts its modulation and output layers at zero (the block is the identity):
    draw them, so that a test of the compiled model sees every layer's effect."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2 and not param.any():
                param.normal_(0, 0.02)


FAMILIES: Dict[str, Callable[[], Case]] = {
    "mamba2": mamba2, "bamba": bamba,
    "dinov2_registers": dinov2_registers, "siglip_vision": siglip_vision, "convnextv2": convnextv2,
    "dit": dit, "unet": unet,
}
LIBRARY = {"dit": "diffusers", "unet": "diffusers"}
CAUSAL_LM = ("mamba2", "bamba")


def available(name: str) -> bool:
    """Whether the library a family is built from is installed."""
    return importlib.util.find_spec(LIBRARY.get(name, "transformers")) is not None
