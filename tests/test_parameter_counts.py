"""Masks are bool parameters (FSDP2 shards them with their weights) but not parameters to count:
the report and a Hugging Face model's num_parameters() count weights only, checked against an
independent count (floating-point parameters; the masks' own sums)."""
from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch

import sift_compiler as sift
from sift_compiler.capture.sources import load_model
from sift_compiler.sparsity import count_parameters, iter_masked

GPT2 = "transformers:gpt2,n_layer=2,n_embd=64,n_head=4,vocab_size=500,n_positions=64"


def floating(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.is_floating_point())


@pytest.fixture(scope="module")
def wide_gpt2():
    source = load_model(GPT2, input_shape=(1, 16))
    dense = floating(source.module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = sift.compile(source.module, "wide", 0.75, source.args, source.kwargs)
    return result, dense


def test_num_parameters_of_a_compiled_hugging_face_model_leaves_out_the_masks(wide_gpt2):
    result, _ = wide_gpt2
    model = result.module
    masks = sum(layer.weight_mask.numel() for _, layer in iter_masked(model))
    assert masks > 0 and sum(p.numel() for p in model.parameters()) == floating(model) + masks  # what FSDP2 shards
    assert model.num_parameters() == floating(model) == count_parameters(model).total
    assert model.num_parameters(only_trainable=True) == floating(model)
    embeddings = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    assert model.num_parameters(exclude_embeddings=True) == floating(model) - embeddings
    copied = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert copied.num_parameters() == loaded.num_parameters() == floating(model)
    assert copied.num_parameters.model is copied and loaded.num_parameters.model is loaded


def test_the_report_counts_weights_and_their_non_zeros(wide_gpt2):
    result, dense = wide_gpt2
    model = result.module
    kept = sum(int(layer.weight_mask.sum()) for _, layer in iter_masked(model))
    masked_weights = sum(layer.weight.numel() for _, layer in iter_masked(model))
    p = result.report.parameters
    assert p["dense"]["total"] == dense and p["sift"]["total"] == floating(model)
    assert p["sift"]["nonzero"] == floating(model) - masked_weights + kept and p["sift"]["masks"] == masked_weights
    assert p["sift"]["nonzero"] < p["sift"]["total"] and "mask entries are not parameters" in result.report.table()
    assert p["dense"]["masks"] == 0 and p["sift"]["active"] == p["sift"]["total"]  # no experts: a token uses all
    assert result.report.to_dict()["parameters"] == p
