"""Sparse Wide on attention as people write it: nanoGPT, timm and Hugging Face styles, several ways.

Every block below computes the same attention; the axis algebra must see through sizes read from
tensors (``B, T, C = x.size()``) and computed from them (``C // n_head``), so that each one widens
like the hand-written reference, with no warning, and runs at other batch and sequence sizes.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sift_compiler as sift
from sift_compiler.capture.sources import load_model
from sift_compiler.errors import PassError, ShortfallError, SiftWarning
from test_sparse_wide import Rolled

N_EMBD, N_HEAD, VOCAB, T = 64, 4, 100, 16


class CausalSelfAttention(nn.Module):
    """nanoGPT's block; ``style`` picks how the code computes its sizes."""

    def __init__(self, style: str):
        super().__init__()
        self.style, self.n_head, self.n_embd = style, N_HEAD, N_EMBD
        self.head_dim = N_EMBD // N_HEAD
        self.c_attn = nn.Linear(N_EMBD, 3 * N_EMBD)
        self.c_proj = nn.Linear(N_EMBD, N_EMBD)

    def forward(self, x):
        B, T, C = x.size()
        qkv = self.c_attn(x)
        if self.style == "split C":
            q, k, v = qkv.split(C, dim=2)
        elif self.style == "chunk":
            q, k, v = qkv.chunk(3, dim=-1)
        else:  # nanoGPT as written
            q, k, v = qkv.split(self.n_embd, dim=2)
        head_dim = self.head_dim if self.style == "stored head_dim" else C // self.n_head
        if self.style == "reshape -1":
            q, k, v = (t.reshape(B, T, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        else:
            q, k, v = (t.view(B, T, self.n_head, head_dim).transpose(1, 2) for t in (q, k, v))
        if self.style == "matmul":
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
            y = att.softmax(dim=-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class TimmAttention(nn.Module):
    """timm's Attention: one reshape to (B, N, 3, heads, head_dim), unbind, reshape(B, N, C)."""

    def __init__(self, style: str):
        super().__init__()
        self.num_heads, self.head_dim = N_HEAD, N_EMBD // N_HEAD
        self.qkv = nn.Linear(N_EMBD, 3 * N_EMBD)
        self.proj = nn.Linear(N_EMBD, N_EMBD)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class GPT(nn.Module):
    """Two blocks, tied embedding and LM head."""

    def __init__(self, attention=CausalSelfAttention, style: str = "nanoGPT"):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, N_EMBD), nn.Embedding(T, N_EMBD)
        self.ln, self.attn = nn.ModuleList(), nn.ModuleList()
        self.mlp = nn.ModuleList()
        for _ in range(2):
            self.ln.append(nn.ModuleList([nn.LayerNorm(N_EMBD), nn.LayerNorm(N_EMBD)]))
            self.attn.append(attention(style))
            self.mlp.append(nn.Sequential(nn.Linear(N_EMBD, 4 * N_EMBD), nn.GELU(), nn.Linear(4 * N_EMBD, N_EMBD)))
        self.ln_f, self.lm_head = nn.LayerNorm(N_EMBD), nn.Linear(N_EMBD, VOCAB, bias=False)
        self.wte.weight = self.lm_head.weight

    def forward(self, idx):
        b, t = idx.size()
        x = self.wte(idx) + self.wpe(torch.arange(0, t, dtype=torch.long, device=idx.device))
        for (ln_1, ln_2), attn, mlp in zip(self.ln, self.attn, self.mlp):
            x = x + attn(ln_1(x))
            x = x + mlp(ln_2(x))
        return self.lm_head(self.ln_f(x))


def _compile(model, attention_width="keep", strict=True):
    torch.manual_seed(0)
    idx = torch.randint(0, VOCAB, (2, T))
    result = sift.compile(model, "wide", 0.75, (idx,), attention_width=attention_width, strict=strict)
    return result, idx


@pytest.fixture(scope="module")
def reference():
    """The stored-head_dim block: the hand-written way that always widened."""
    torch.manual_seed(0)
    return {width: _compile(GPT(style="stored head_dim"), width)[0].report.effective_sparsity
            for width in ("keep", "scale")}


@pytest.mark.parametrize("width", ["keep", "scale"])
@pytest.mark.parametrize("style", ["nanoGPT", "split C", "chunk", "reshape -1", "matmul"])
def test_nanogpt_widens_like_the_hand_written_block(style, width, reference):
    torch.manual_seed(0)
    result, idx = _compile(GPT(style=style), width)  # strict: a shortfall would raise
    module = result.module
    assert module.get_submodule("ln.0.0").normalized_shape == (2 * N_EMBD,)          # d_model x k
    assert module.get_submodule("mlp.1.0").out_features == 8 * N_EMBD
    inner = N_EMBD if width == "keep" else 2 * N_EMBD                               # heads x head_dim
    assert module.get_submodule("attn.0.c_attn").out_features == 3 * inner
    assert module.get_submodule("attn.0.c_proj").in_features == inner
    assert result.report.effective_sparsity == pytest.approx(reference[width], abs=1e-9)
    assert abs(result.report.flop_ratio - 1) < 0.005
    assert module(idx).shape == (2, T, VOCAB)
    assert module(torch.randint(0, VOCAB, (3, 9))).shape == (3, 9, VOCAB)         # sizes still read at run time


def test_head_dim_stays_computed_where_it_can():
    """With scale, ``C // n_head`` still computes the head dim (d_model rounds to the heads)."""
    result, _ = _compile(GPT(style="nanoGPT"), "scale")
    views = [n for n in result.graph_module.graph.nodes if n.target == "view" and len(n.args) == 5]
    assert views and all(getattr(n.args[4], "target", None).__name__ == "floordiv" for n in views)


def test_timm_style_attention_widens_fully():
    result, idx = _compile(GPT(TimmAttention, "timm"))
    assert result.module.get_submodule("attn.0.qkv").in_features == 2 * N_EMBD
    assert result.module.get_submodule("attn.0.proj").out_features == 2 * N_EMBD
    assert result.module(idx).shape == (2, T, VOCAB)


GPT2 = "transformers:gpt2,n_layer=1,n_embd=64,n_head=4,vocab_size=128,n_positions=64"


@pytest.mark.parametrize("width, inner", [("keep", 64), ("scale", 128)])
def test_hugging_face_gpt2_widens_fully(width, inner):
    """transformers' GPT-2 (fused c_attn split in three, heads from views): no shortfall either way."""
    source = load_model(GPT2, input_shape=(1, 16))
    result = sift.compile(source.module, "wide", 0.75, source.args, source.kwargs, attention_width=width,
                          strict=True)
    attn = result.module.get_submodule("transformer.h.0.attn")
    assert attn.c_attn.in_features == 128 and attn.c_attn.out_features == 3 * inner
    assert attn.c_proj.in_features == inner and attn.c_proj.out_features == 128
    assert result.module(**source.kwargs).logits.shape == (1, 16, 128)


LLAMA = ("transformers:llama,hidden_size=64,intermediate_size=256,num_attention_heads=4,num_key_value_heads=2,"
         "num_hidden_layers=1,vocab_size=128,max_position_embeddings=64")


def test_hugging_face_llama_with_grouped_kv_heads():
    """transformers' Llama (GQA, RoPE) widens fully with keep; with scale RoPE's half-rotation keeps
    q and k at their head dim, which is said (a warning, not a silent narrow model)."""
    source = load_model(LLAMA, input_shape=(1, 16))
    result = sift.compile(source.module, "wide", 0.75, source.args, source.kwargs, strict=True)
    attn = "model.layers.0.self_attn"
    assert result.module.get_submodule(f"{attn}.q_proj").in_features == 128
    assert result.module.get_submodule(f"{attn}.k_proj").out_features == 32                      # 2 kv heads x 16
    assert result.module(**source.kwargs).logits.shape == (1, 16, 128)
    with pytest.warns(SiftWarning, match="kept at width.*q_proj.*partly sliced"):
        scaled = sift.compile(source.module, "wide", 0.75, source.args, source.kwargs, attention_width="scale")
    assert scaled.module(**source.kwargs).logits.shape == (1, 16, 128)


def test_shortfall_warns_in_one_line_or_fails_with_strict():
    x = torch.randn(1, 3, 16, 16)
    with pytest.warns(SiftWarning) as caught:
        result = sift.compile(Rolled(), "wide", 0.75, (x,))
    [warning] = [w for w in caught if issubclass(w.category, SiftWarning)]
    assert "\n" not in str(warning.message) and "no coupling rule for roll" in str(warning.message)
    assert any(n.startswith("not as asked: ") for n in result.report.notes)
    with pytest.raises(ShortfallError, match="wide at s = 0.75 not applied as asked"):
        sift.compile(Rolled(), "wide", 0.75, (x,), strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SiftWarning)
        sift.compile(Rolled(), "parallel", 0.75, (x,))   # nothing to complain about


def test_nothing_to_transform_is_said():
    """Only a first and a last layer: every weight layer stays dense, and the user hears it."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.warns(SiftWarning, match="no layer could be transformed"):
        result = sift.compile(model, "parallel", 0.75, (torch.randn(2, 8),))
    assert all(layer.kept_dense for layer in result.report.layers)


def test_wide_with_nothing_sparse_between_first_and_last_is_refused():
    """Sparse Wide would widen the inner side of the dense first and last layers (2x their FLOPs)
    with no sparse layer to pay for it: refused, not returned at twice the FLOPs with a warning."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(PassError, match=r"no layer could be made sparse.*768 FLOPs.*384"):
        sift.compile(model, "wide", 0.75, (torch.randn(2, 8),))
