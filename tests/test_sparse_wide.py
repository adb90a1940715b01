"""Sparse Wide: widths of the paper, consistency on random graphs, and safe refusals."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import sift_compiler as sift
from sift_compiler.errors import PassError
from sift_compiler.capture.sources import load_model
from sift_compiler.passes.sparse_wide import widening_factor
from sift_compiler.testing import assert_masks_exact

# Reference code (research notes §2): base width int(64 k) and its binary-searched s'.
REFERENCE_S_PRIME = {0.5: 0.50972, 0.75: 0.76902, 0.9: 0.91601}


@pytest.mark.parametrize("sparsity, stem_width", [(0.5, 91), (0.75, 128), (0.9, 202)])
def test_resnet18_widths_and_compensation(sparsity, stem_width):
    """Nearest rounding (round_to 1): 64 k = 90.5 -> 91 where the reference truncates to 90."""
    source = load_model("torchvision:resnet18", input_shape=(1, 3, 224, 224))
    result = sift.compile(source.module, "wide", sparsity, source.args)
    module = result.module
    assert module.get_submodule("conv1").out_channels == stem_width
    assert module.get_submodule("layer4.1.conv2").out_channels == round(512 * widening_factor(sparsity))
    assert module.get_submodule("fc").in_features == round(512 * widening_factor(sparsity))
    assert module.get_submodule("fc").out_features == 1000
    assert result.report.effective_sparsity == pytest.approx(REFERENCE_S_PRIME[sparsity], abs=0.01)
    assert abs(result.report.flop_ratio - 1) < 1e-3


def _gpt3_small():
    """Built on the meta device: these tests assert planned widths, ratios and output shapes, which
    a meta compile plans exactly as a real-weight one (tests/test_meta_compile.py), without drawing
    125M weights; the forward below runs on meta too (shapes through the native model)."""
    spec = "transformers:gpt2,n_layer=12,n_embd=768,n_head=12,vocab_size=1000,n_positions=64"
    return load_model(spec, input_shape=(1, 16), meta=True)


@pytest.mark.parametrize("sparsity, d_model, d_ff", [(0.5, 1092, 4344), (0.75, 1536, 6144)])
def test_gpt3_small_table14_widths(sparsity, d_model, d_ff):
    source = _gpt3_small()
    result = sift.compile(source.module, "wide", sparsity, source.args, source.kwargs)
    module = result.module
    for i in (0, 11):
        block = f"transformer.h.{i}"
        assert module.get_submodule(f"{block}.ln_1").normalized_shape == (d_model,)
        assert module.get_submodule(f"{block}.mlp.c_fc").out_features == d_ff
        # attention inner width kept: 12 heads x 64 for each of q, k, v
        assert module.get_submodule(f"{block}.attn.c_attn").out_features == 3 * 768
        assert module.get_submodule(f"{block}.attn.c_attn").in_features == d_model
        assert module.get_submodule(f"{block}.attn.c_proj").in_features == 768
    assert module.get_submodule("transformer.wte").embedding_dim == d_model
    assert module.get_submodule("lm_head").weight is module.get_submodule("transformer.wte").weight  # still tied
    assert abs(result.report.flop_ratio - 1) < 0.005
    # attention-score FLOPs are reported separately and are not iso-FLOP-compensated
    assert result.report.categories["sift"]["attention"] == pytest.approx(result.report.categories["dense"]["attention"])
    logits = result.module(**source.kwargs).logits
    assert logits.shape == (1, 16, 1000)


def test_attention_width_scale_grows_head_dim():
    source = _gpt3_small()
    result = sift.compile(source.module, "wide", 0.5, source.args, source.kwargs, attention_width="scale")
    attn = result.module.get_submodule("transformer.h.0.attn.c_attn")
    assert attn.in_features == 1092 and attn.out_features == 3 * 1092  # 12 heads x 91
    assert result.module(**source.kwargs).logits.shape == (1, 16, 1000)


def test_rounding_never_undoes_the_widening():
    """make fuzz found it: d_model 24 with 3 heads and round_to 8 must be a multiple of 24, and the
    nearest one to 24 k = 33.9 is 24 itself. The group takes the next multiple up (48) instead of
    silently staying at width; compensation makes it iso-FLOP."""
    import fuzz_models
    spec = {"tied": False, "head_dim": 8, "act": "gelu", "tokens": 8, "ffn": 2, "classes": 5, "family": "attention",
            "cls": False, "heads": 3, "vocab": 16, "ids": True, "features": 8, "style": "sdpa", "layers": 2}
    model, inputs = fuzz_models.build(spec, 4078)
    result = sift.compile(model, "wide", 0.5, inputs, attention_width="keep", round_to=8)
    assert result.module.get_submodule("blocks.0.attn.qkv").in_features == 48
    assert result.module.get_submodule("blocks.0.mlp.0").out_features == 64  # 48 k = 67.9: nearest multiple of 8
    assert abs(result.report.flop_ratio - 1) < 0.005
    assert_masks_exact(result.module)


def test_sparsity_zero_is_the_dense_model():
    source = load_model("torchvision:resnet18", input_shape=(2, 3, 64, 64))
    model = source.module.eval()
    result = sift.compile(model, "wide", 0.0, source.args)
    result.module.eval()
    with torch.no_grad():
        torch.testing.assert_close(result.module(*source.args), model(*source.args))


class Rolled(nn.Module):
    """torch.roll over channels has no coupling rule: its group must keep its width."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 32, 3, padding=1)
        self.c = nn.Conv2d(32, 32, 3, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.a(self.stem(x)))
        x = torch.roll(x, 1, dims=1)
        x = torch.relu(self.c(self.b(x)))
        return self.head(x.mean((2, 3)))


def test_unknown_op_keeps_its_group_and_says_so():
    x = torch.randn(1, 3, 16, 16)
    result = sift.compile(Rolled(), "wide", 0.75, (x,))
    module = result.module
    assert module.get_submodule("a").out_channels == 16          # touched by roll: kept
    assert module.get_submodule("b").out_channels == 64          # free: 32 * 2
    assert any("roll" in note for note in result.report.notes), result.report.notes
    assert module(x).shape == (1, 10)
    assert abs(result.report.flop_ratio - 1) < 0.005


# -- random graphs -------------------------------------------------------------------------
class RandomNet(nn.Module):
    """A CNN drawn by hypothesis: residual adds, concatenations and grouped convs."""

    def __init__(self, plan, width, groups):
        super().__init__()
        self.plan = plan
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.ModuleList()
        channels = width
        for kind in plan:
            if kind == "residual":
                self.blocks.append(nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, groups=groups),
                                                 nn.BatchNorm2d(channels), nn.ReLU(),
                                                 nn.Conv2d(channels, channels, 1)))
            elif kind == "concat":
                self.blocks.append(nn.Conv2d(channels, width, 3, padding=1))
                channels += width
            else:  # "conv": change the width
                self.blocks.append(nn.Sequential(nn.Conv2d(channels, channels * 2, 1), nn.BatchNorm2d(channels * 2)))
                channels *= 2
        self.head = nn.Linear(channels, 7)

    def forward(self, x):
        x = self.stem(x)
        for kind, block in zip(self.plan, self.blocks):
            if kind == "residual":
                x = torch.relu(x + block(x))
            elif kind == "concat":
                x = torch.cat([x, torch.relu(block(x))], 1)
            else:
                x = torch.relu(block(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=st.lists(st.sampled_from(["residual", "concat", "conv"]), min_size=1, max_size=4),
       width=st.sampled_from([32, 48]), groups=st.sampled_from([1, 2, 4]),
       sparsity=st.sampled_from([0.5, 0.75, 0.9]))
def test_random_graphs_widen_consistently(plan, width, groups, sparsity):
    torch.manual_seed(0)
    model = RandomNet(plan, width, groups)
    x = torch.randn(2, 3, 8, 8)
    try:
        result = sift.compile(model, "wide", sparsity, (x,))
    except PassError as e:  # a stem that outweighs the rest cannot be paid for once widened
        assert "no sparsity can make this model iso-FLOP" in str(e)
        assume(False)
    out = result.module(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    assert_masks_exact(result.module)
    for name, module in result.module.named_modules():
        if isinstance(module, nn.Conv2d) and module.groups > 1:
            assert module.in_channels % module.groups == 0 and module.out_channels % module.groups == 0, name
    # widened: the stem's output group grew
    assert result.module.get_submodule("stem").out_channels > width
    assert abs(result.report.flop_ratio - 1) < 0.005
