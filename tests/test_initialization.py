"""A model's own init routine on masked layers: replayed on the kept weights alone when it is
elementwise (`initialization.kept_weight_init`), drawn whole and masked when it is not."""
import math

import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

from sift_compiler.initialization import HuggingFaceInit, kept_weight_init, stream_seed
from sift_compiler.sparsity.init import layer_generator, random_mask
from sift_compiler.sparsity.layers import MaskedLinear

SHAPE = (256, 512)


def _masked(density: float = 0.25, seed: int = 3) -> MaskedLinear:
    layer = MaskedLinear(SHAPE[1], SHAPE[0])
    layer.install_mask(random_mask(SHAPE, density, layer_generator(seed, "layer")))
    return layer


def _draws(init) -> list:
    layer = _masked()
    draws = kept_weight_init(lambda: init(layer), layer)
    assert isinstance(layer.weight, nn.Parameter) and layer.weight.device.type == "cpu"  # the stand-in is gone
    return draws if draws is None else [str(op) for op, _, _ in draws]


def test_elementwise_inits_are_recorded_op_by_op():
    assert _draws(lambda m: nn.init.normal_(m.weight, 0.0, 0.02)) == ["aten.normal_.default"]
    assert _draws(lambda m: nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5))) == ["aten.uniform_.default"]
    assert _draws(lambda m: (m.weight.uniform_(-1, 1), m.weight.mul_(0.5), m.weight.add_(0.1))) == \
        ["aten.uniform_.default", "aten.mul_.Tensor", "aten.add_.Tensor"]


@pytest.mark.parametrize("init", [
    lambda m: nn.init.orthogonal_(m.weight),                    # QR of the whole matrix
    lambda m: nn.init.trunc_normal_(m.weight, std=0.02),        # reads its draws (rejection)
    lambda m: m.weight.data.normal_(0, 0.02),                   # an alias the recorder cannot follow
    lambda m: m.weight[0].fill_(1.0),                           # one row: position-dependent
    lambda m: m.weight.mul_(torch.full(SHAPE, 2.0)),            # a tensor operand
    lambda m: None,                                             # leaves the weight alone
], ids=["orthogonal", "trunc_normal", "data", "row", "tensor-operand", "nothing"])
def test_other_inits_are_drawn_whole(init):
    assert _draws(init) is None


def test_a_failing_init_is_drawn_whole_and_raises_there():
    def broken(layer):
        raise RuntimeError("broken init")
    layer = _masked()
    assert kept_weight_init(lambda: broken(layer), layer) is None
    assert layer.weight.device.type == "cpu"


def _llama(init_weights=None):
    config = LlamaConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=100, initializer_range=0.05)
    model = LlamaForCausalLM(config)
    if init_weights is not None:
        model._init_weights = init_weights
    return model


def test_hugging_face_init_draws_the_kept_weights_from_the_models_distribution():
    layer = _masked(density=0.25)
    layer.bias.data.fill_(7.0)
    HuggingFaceInit(_llama()).draw_masked(layer, "layer", seed=0)
    kept = layer.weight[layer.weight_mask]
    assert int(torch.count_nonzero(layer.weight)) == int(layer.weight_mask.sum())  # zeros off the mask only
    assert kept.std().item() == pytest.approx(0.05, rel=0.03) and abs(kept.mean().item()) < 0.002
    assert not layer.bias.any()  # the model's routine zeroes biases, for real
    again = _masked(density=0.25)
    HuggingFaceInit(_llama()).draw_masked(again, "layer", seed=0)
    assert torch.equal(again.weight, layer.weight)  # one stream per (seed, path)


def test_hugging_face_init_that_is_not_elementwise_is_the_whole_draw_masked():
    def orthogonal(module):
        if isinstance(module, nn.Linear):
            nn.init.orthogonal_(module.weight)
    layer = _masked(density=0.25)
    HuggingFaceInit(_llama(orthogonal)).draw_masked(layer, "layer", seed=0)
    whole = torch.empty(SHAPE)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(0, "layer"))
        nn.init.orthogonal_(whole)
    assert torch.equal(layer.weight, whole * layer.weight_mask)
