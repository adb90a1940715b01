"""Tiny configs of every model family sift-compiler is checked on, with example inputs.

One place for the families (the 2018-2024 ones and those of 2025-2026: modern attention,
encoder-decoders, mixture-of-experts, state-space models, modern vision, diffusion), shared by
the tests and by ``benchmarks/support_matrix.py``. Random weights, a few layers, nothing
downloaded. A family whose library is not installed says so (``Family.missing``).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

from model_zoo import Case

VOCAB, TOKENS = 256, 12


@dataclass(frozen=True)
class Family:
    """A model family: how to build a tiny instance and what kind of model it is.

    ``kind``: "causal" (a causal LM: ``generate()`` is checked), "seq2seq" (an encoder-decoder:
    ``generate()`` too), "encoder" or "vision". ``requires``: the library the family needs.
    """

    name: str
    build: Callable[[], Case] = field(repr=False)
    kind: str
    requires: str = "transformers"
    note: str = ""

    @property
    def missing(self) -> Optional[str]:
        """Why the family cannot be built here, or None."""
        if importlib.util.find_spec(self.requires) is None:
            return f"{self.requires} is not installed"
        return None


def _ids(batch: int = 1, tokens: int = TOKENS, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def _hf(model_type: str, head: str = "causal", **options: Any) -> nn.Module:
    import transformers
    from transformers import AutoConfig
    config = AutoConfig.for_model(model_type, **options)
    cls = {"causal": transformers.AutoModelForCausalLM, "seq2seq": transformers.AutoModelForSeq2SeqLM,
           "masked": transformers.AutoModelForMaskedLM,
           "speech": transformers.AutoModelForSpeechSeq2Seq, "base": transformers.AutoModel}[head]
    torch.manual_seed(0)
    return cls.from_config(config).eval()


def _causal(model_type: str, **options: Any) -> Callable[[], Case]:
    def build() -> Case:
        return Case(_hf(model_type, "causal", **{**_DECODER, **options}), (), {"input_ids": _ids()})
    return build


# a decoder-only transformer: 2 layers, d_model 64, 4 heads of 16 (2 key/value heads)
_DECODER = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _gpt2() -> Case:
    model = _hf("gpt2", n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=1,
                eos_token_id=2)
    return Case(model, (), {"input_ids": _ids()})


def _bert() -> Case:
    model = _hf("bert", "masked", num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64)
    return Case(model, (), {"input_ids": _ids()})


def _deepseek_v3() -> Case:
    # multi-head latent attention: low-rank q (q_lora_rank) and kv (kv_lora_rank) projections, the
    # head dim split into a RoPE part and a no-RoPE part; every layer dense (no MoE)
    model = _hf("deepseek_v3", **{**_DECODER, "num_key_value_heads": 4}, q_lora_rank=40, kv_lora_rank=20,
                qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, first_k_dense_replace=2,
                n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_group=1, topk_group=1)
    return Case(model, (), {"input_ids": _ids()})


def _moe(model_type: str, **options: Any) -> Callable[[], Case]:
    # 4 experts, top-2, expert hidden size 32
    return _causal(model_type, num_local_experts=4, num_experts=4, num_experts_per_tok=2,
                   moe_intermediate_size=32, **options)


def _deepseek_v3_moe() -> Case:
    # the second layer is a mixture of experts (4 routed, top-2, one shared expert)
    model = _hf("deepseek_v3", **{**_DECODER, "num_key_value_heads": 4}, q_lora_rank=40, kv_lora_rank=20,
                qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, first_k_dense_replace=1,
                n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                n_group=1, topk_group=1)
    return Case(model, (), {"input_ids": _ids()})


def _mamba2() -> Case:
    model = _hf("mamba2", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, state_size=16, expand=2,
                head_dim=16, num_heads=8, n_groups=1, conv_kernel=4, chunk_size=8,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return Case(model, (), {"input_ids": _ids()})


def _bamba() -> Case:
    # a hybrid: one Mamba-2 layer, one attention layer
    model = _hf("bamba", **_DECODER, attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1,
                mamba_d_state=16, mamba_expand=2, mamba_chunk_size=8, mamba_d_conv=4)
    return Case(model, (), {"input_ids": _ids()})


def _diffusers(kind: str) -> Callable[[], Case]:
    def build() -> Case:
        import diffusers
        torch.manual_seed(0)
        generator = torch.Generator().manual_seed(0)
        if kind == "dit":
            model = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                                    num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
            kwargs = {"hidden_states": torch.randn(1, 4, 8, 8, generator=generator), "timestep": torch.tensor([3]),
                      "class_labels": torch.tensor([1])}
        else:
            model = diffusers.UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                                          block_out_channels=(32, 64), norm_num_groups=8,
                                          down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                          up_block_types=("AttnUpBlock2D", "UpBlock2D"))
            kwargs = {"sample": torch.randn(1, 3, 16, 16, generator=generator), "timestep": torch.tensor([3])}
        return Case(model.eval(), (), kwargs)
    return build


def _seq2seq(model_type: str, **options: Any) -> Callable[[], Case]:
    def build() -> Case:
        model = _hf(model_type, "seq2seq", **options)
        return Case(model, (), {"input_ids": _ids(), "decoder_input_ids": _ids(tokens=6, seed=1)})
    return build


def _whisper() -> Case:
    model = _hf("whisper", "speech", vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                num_mel_bins=16, max_source_positions=16, max_target_positions=32,
                decoder_start_token_id=1, pad_token_id=0, eos_token_id=2, bos_token_id=1,
                suppress_tokens=None, begin_suppress_tokens=None)
    features = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(0))  # mel bins x 2 * source positions
    return Case(model, (), {"input_features": features, "decoder_input_ids": _ids(tokens=6, seed=1)})


def _vision(spec: str, shape: Tuple[int, ...]) -> Callable[[], Case]:
    def build() -> Case:
        from sift_compiler.capture.sources import load_model
        source = load_model(spec, input_shape=shape)
        return Case(source.module.eval(), source.args, source.kwargs)
    return build


def _hf_vision(model_type: str, **options: Any) -> Callable[[], Case]:
    def build() -> Case:
        model = _hf(model_type, "base", **options)
        size = options.get("image_size", 32)
        pixels = torch.randn(1, options.get("num_channels", 3), size, size, generator=torch.Generator().manual_seed(0))
        return Case(model, (), {"pixel_values": pixels})
    return build


FAMILIES: Dict[str, Family] = {f.name: f for f in [
    # 2018-2024
    Family("resnet18", _vision("torchvision:resnet18", (1, 3, 32, 32)), "vision", "torchvision"),
    Family("vit", _vision("timm:vit_tiny_patch16_224,img_size=32,depth=2", (1, 3, 32, 32)), "vision", "timm"),
    Family("gpt2", _gpt2, "causal"),
    Family("bert", _bert, "encoder"),
    Family("llama", _causal("llama"), "causal"),
    Family("qwen2", _causal("qwen2"), "causal"),
    # attention as written in 2026
    Family("qwen3", _causal("qwen3", head_dim=16), "causal", note="q/k RMSNorm per head"),
    Family("olmo2", _causal("olmo2"), "causal", note="q/k RMSNorm over all heads"),
    Family("gemma2", _causal("gemma2", head_dim=16, sliding_window=8, attn_logit_softcapping=50.0,
                             final_logit_softcapping=30.0), "causal",
           note="sliding window, logit soft-capping, scaled embeddings"),
    Family("gemma3", _causal("gemma3_text", head_dim=16, sliding_window=8, sliding_window_pattern=2), "causal",
           note="q/k norms, sliding window, scaled embeddings"),
    Family("phi3", _causal("phi3", partial_rotary_factor=0.5), "causal", note="fused qkv, partial rotary"),
    Family("stablelm", _causal("stablelm", partial_rotary_factor=0.25), "causal", note="partial rotary"),
    Family("gpt_neox", _causal("gpt_neox", rotary_pct=0.25), "causal", note="fused qkv, partial rotary"),
    Family("deepseek_v3", _deepseek_v3, "causal", note="multi-head latent attention, dense layers"),
    # encoder-decoders
    Family("t5", _seq2seq("t5", vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                          num_decoder_layers=2, num_heads=4, decoder_start_token_id=0), "seq2seq"),
    Family("bart", _seq2seq("bart", vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
                            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                            decoder_ffn_dim=128, max_position_embeddings=64), "seq2seq"),
    Family("whisper", _whisper, "seq2seq"),
    # mixture-of-experts (fused 3-D expert parameters)
    Family("mixtral", _moe("mixtral"), "causal", note="4 experts, top-2"),
    Family("qwen3_moe", _moe("qwen3_moe", head_dim=16, decoder_sparse_step=1, mlp_only_layers=[]), "causal",
           note="4 experts, top-2"),
    Family("deepseek_v3_moe", _deepseek_v3_moe, "causal", note="MLA + 4 routed experts, top-2, 1 shared"),
    # state-space and hybrid
    Family("mamba2", _mamba2, "causal"),
    Family("bamba", _bamba, "causal", note="hybrid: Mamba-2 + attention layers"),
    # modern vision and diffusion
    Family("dinov2", _hf_vision("dinov2_with_registers", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=128, image_size=32, patch_size=8, num_register_tokens=2),
           "vision", note="registers, layer scale"),
    Family("siglip", _hf_vision("siglip_vision_model", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=128, image_size=32, patch_size=8), "vision"),
    Family("convnextv2", _hf_vision("convnextv2", hidden_sizes=[16, 32], depths=[1, 1], num_stages=2,
                                    image_size=32), "vision", note="GRN"),
    Family("dit", _diffusers("dit"), "vision", "diffusers", note="adaLN-Zero"),
    Family("unet", _diffusers("unet"), "vision", "diffusers", note="time embedding"),
]}
