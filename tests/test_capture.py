"""Capture: any model -> a canonical graph that computes what the model computes."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import sift_compiler as sift
from sift_compiler.analyses.layers import analyze_layers
from sift_compiler.capture import capture
from sift_compiler.capture.modules import ExplicitMultiheadAttention, canonicalize_modules
from sift_compiler.errors import CaptureError, UserInputError


class DataDependent(nn.Module):
    """Python control flow on a tensor value: neither fx nor torch.export can capture it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:
            return self.a(x)
        return self.b(x)


def test_untraceable_model_error_names_module_line_and_remedy():
    with pytest.raises(CaptureError) as info:
        capture(DataDependent(), (torch.randn(2, 8),))
    message = str(info.value)
    assert "DataDependent" in message
    assert "test_capture.py:" in message            # the user's line where fx gave up
    assert "leaf" in message or "traceable" in message  # what to try


def test_input_the_model_rejects_is_a_user_error():
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(UserInputError, match=r"rejects the example input \(\(2, 5\) float32\)"):
        sift.compile(model, "parallel", 0.5, (torch.randn(2, 5),))


def test_user_model_is_not_modified():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    before = copy.deepcopy(model.state_dict())
    result = sift.compile(model, "parallel", 0.75, (torch.randn(2, 8),))
    for p in result.module.parameters():
        if p.is_floating_point():       # masks are bool parameters
            p.data.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model[2], nn.Linear) and type(model[2]) is nn.Linear


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_explicit_attention_matches_torch(batch_first, need_weights):
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    explicit = ExplicitMultiheadAttention.from_torch(mha).eval()
    x = torch.randn(3, 5, 32)
    mask = torch.zeros(3 if batch_first else 5, 5 if batch_first else 3, dtype=torch.bool)
    mask[:, -1] = True
    with torch.no_grad():
        expected = mha(x, x, x, need_weights=need_weights, key_padding_mask=mask)
        actual = explicit(x, x, x, need_weights=need_weights, key_padding_mask=mask)
    torch.testing.assert_close(actual[0], expected[0], atol=1e-5, rtol=1e-4)
    if need_weights:
        torch.testing.assert_close(actual[1], expected[1], atol=1e-5, rtol=1e-4)


def test_gpt2_conv1d_becomes_linear():
    from transformers.pytorch_utils import Conv1D
    holder = nn.Sequential(Conv1D(6, 4))
    x = torch.randn(2, 3, 4)
    expected = holder(x)
    assert list(canonicalize_modules(holder)) == ["0"]
    assert type(holder[0]) is nn.Linear
    torch.testing.assert_close(holder(x), expected)


class NamesLie(nn.Module):
    """The head is called 'stem', the stem 'classifier', and a middle layer has 10 outputs
    (= the classes): first/last must come from the data flow, not from names or shapes."""

    def __init__(self):
        super().__init__()
        self.classifier = nn.Conv2d(3, 16, 3, padding=1)
        self.middle = nn.Conv2d(16, 10, 3, padding=1)
        self.more = nn.Conv2d(10, 16, 3, padding=1)
        self.stem = nn.Linear(16, 10)

    def forward(self, x):
        x = self.more(torch.relu(self.middle(torch.relu(self.classifier(x)))))
        return self.stem(x.mean((2, 3)))


def test_first_and_last_come_from_data_flow():
    gm = capture(NamesLie(), (torch.randn(1, 3, 8, 8),)).module
    table = analyze_layers(gm)
    assert table.layers["classifier"].first and not table.layers["classifier"].last
    assert table.layers["stem"].last and not table.layers["stem"].first
    assert [layer.target for layer in table.transformable("parallel")] == ["middle", "more"]


def test_export_capture_keeps_dynamic_batch_and_train_mode():
    from sift_compiler.capture.sources import load_model
    source = load_model("transformers:gpt2,n_layer=1,n_embd=32,n_head=2,vocab_size=100,n_positions=32",
                        input_shape=(1, 8))
    source.module.train()
    result = capture(source.module, source.args, source.kwargs)
    assert result.method == "export"
    gm = result.module
    assert gm.training
    assert any(isinstance(m, nn.Dropout) and m.training for m in gm.modules())
    out = gm(input_ids=torch.randint(0, 100, (3, 12))).logits
    assert out.shape == (3, 12, 100)


def test_error_reports_quote_one_line_of_a_library_error_even_an_empty_one():
    from sift_compiler.errors import first_line
    assert first_line(RuntimeError()) == ""  # str(e).splitlines()[0] raised IndexError here
    assert first_line(RuntimeError("\n  shape mismatch\nTraceback ...")) == "shape mismatch"
    assert first_line(ValueError("x" * 1000)) == "x" * 300 and len(first_line(ValueError("y" * 50), 20)) == 20


class FrozenNorm(nn.Module):
    """A training model whose BatchNorm is frozen in eval mode (fine-tuning with fixed statistics)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.body(torch.relu(self.norm(self.stem(x)))))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("method", ["fx", "export"])
def test_a_submodule_in_eval_mode_stays_in_eval_mode(method):
    """Capture and compile give every submodule its own training flag back, not the root's: the
    user's model, the captured graph and the compiled model keep the frozen BatchNorm frozen."""
    model = FrozenNorm().train()
    model.norm.eval()
    x = torch.randn(2, 3, 8, 8)
    graph = capture(model, (x,), method=method).module
    assert graph.training and not graph.get_submodule("norm").training
    result = sift.compile(model, "parallel", 0.75, (x,), capture_method=method)
    assert model.training and not model.norm.training
    for compiled in (result.module, result.graph_module):
        assert compiled.training and not compiled.get_submodule("norm").training, type(compiled).__name__
