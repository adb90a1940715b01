"""The exporter on real models: every transform of ResNet-18 and a transformer, verified for real.

Each export runs the exporter's own checks with DeepSparse required (our dev environment and CI
install it): onnx checker, per-layer sparsity, onnxruntime against torch, DeepSparse compiles it
and agrees with onnxruntime. The tests then check the file independently of those checks.
"""
from __future__ import annotations

import copy
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnx import numpy_helper

import sift_compiler as sift
from sift_compiler.errors import UserInputError
from checks import tensors
from sift_compiler.exporters import onnx as onnx_exporter
from sift_compiler.exporters.forms import DEFAULT_FORM, apply_form
from sift_compiler.exporters.onnx import export_onnx
from sift_compiler.exporters.runtimes import open_engine
from sift_compiler.exporters.weights import layers_from_metadata, weight_arrays
from sift_compiler.sparsity.layers import MaskedConv2d, iter_masked

ALL_CHECKS = {"onnx-checker", "sparsity", "onnxruntime-vs-torch", "onnxruntime-other-shape", "deepsparse-compiles",
              "deepsparse-vs-onnxruntime"}
TRANSFORMS = ["none", "parallel", "factorized", "doped", "wide"]


_EXPORTS = {}
# One worker makes the five exports (the Sparse Parallel one is read by three tests): with the tests
# spread over two workers, both compiled and verified the same ResNet-18 exports.
R18 = pytest.mark.xdist_group("resnet18-exports")


def resnet18_export(transform: str, tmp_path_factory):
    """ResNet-18 (64 x 64) compiled with ``transform`` at s = 0.5 and exported; once per test process."""
    if transform not in _EXPORTS:
        import torchvision
        torch.manual_seed(0)
        x = torch.randn(1, 3, 64, 64)
        result = sift.compile(torchvision.models.resnet18(), transform, 0.5 if transform != "none" else 0.0, (x,))
        path = str(tmp_path_factory.mktemp("r18") / f"{transform}.onnx")
        _EXPORTS[transform] = (result, export_onnx(result.module, (x,), path, deepsparse="require"), x)
    return _EXPORTS[transform]


@R18
@pytest.mark.deepsparse
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_every_transform_of_resnet18_exports_verified(tmp_path_factory, transform):
    result, info, x = resnet18_export(transform, tmp_path_factory)
    verification = info.verification
    assert verification.ok, verification.table()
    assert {c.name for c in verification.checks} == ALL_CHECKS
    assert all(c.status == "ok" for c in verification.checks), verification.table()
    assert verification.fraction_of_supported_ops == 1.0
    assert verification.errors["onnxruntime-vs-torch"].rel < 1e-5
    assert verification.errors["deepsparse-vs-onnxruntime"].rel < 1e-4

    model = onnx.load(info.path)
    assert model.ir_version <= 9 and model.opset_import[0].version == 17
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    # zeros are +0.0 everywhere: bit-level sparsity detectors see them
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        assert not np.any((array == 0) & np.signbit(array)), init.name

    # one record per sparse layer of the exported form; each at its target, zeros intact
    formed = apply_form(result.graph_module, info.form).module
    sparse = {name: layer for name, layer in iter_masked(formed) if layer.target_density < 1}
    assert sorted({la.layer for la in info.layers}) == sorted(sparse)
    assert (transform == "none") == (not info.layers)
    arrays = {t.initializer: a for t, a in weight_arrays(model)}
    for record in info.layers:
        layer = sparse[record.layer]
        kept = (layer.masked_weight() != 0).detach().numpy()  # the mask's positions, minus weights that are 0
        assert record.nnz == record.mask_nnz == int(kept.sum()) <= int(layer.weight_mask.sum()), record
        assert record.nnz <= record.max_nnz
        assert record.sparsity >= 1 - layer.target_density - 0.5 * record.parts / record.numel
        # the file's non-zeros sit exactly where the masked weight has them
        assert np.array_equal(arrays[record.initializer] != 0, kept)
    # the metadata lets sift-check find the same records without the model
    assert [(la.layer, la.initializer, la.nnz) for la in layers_from_metadata(model)] == \
        [(la.layer, la.initializer, la.nnz) for la in info.layers]


def _conv_readers(model) -> dict:
    readers = {}
    for node in model.graph.node:
        if node.op_type == "Conv":
            readers[node.input[0]] = readers.get(node.input[0], 0) + 1
    return readers


@R18
@pytest.mark.deepsparse
def test_parallel_resnet18_has_no_summed_convs_and_runs_any_batch(tmp_path_factory, tmp_path):
    """stacked-conv: one stacked conv and a 1x1 sum per layer, so no input feeds the branch convs DeepSparse mis-sums."""
    result, _, x = resnet18_export("parallel", tmp_path_factory)
    info = export_onnx(result.module, (x,), str(tmp_path / "stacked.onnx"), form="stacked-conv", deepsparse="require")
    assert info.verification.ok, info.verification.table()
    model = onnx.load(info.path)
    assert max(_conv_readers(model).values()) == 2  # a block input feeds its stacked conv1 and its downsample only
    assert sum(node.op_type == "Add" for node in model.graph.node) == 8  # the residual adds, nothing else
    assert not any(node.op_type == "BatchNormalization" for node in model.graph.node)  # all folded
    engine = open_engine("deepsparse", info.path, 3, None, [[3, 3, 64, 64]])
    assert engine.run({"input": np.random.randn(3, 3, 64, 64).astype(np.float32)})[0].shape == (3, 1000)


@R18
def test_auto_form_without_a_deepsparse_check_writes_the_stacked_form(tmp_path_factory, tmp_path):
    """The default form keeps branches only where DeepSparse verified them on the file."""
    import torchvision
    assert DEFAULT_FORM == "auto"
    result, _, x = resnet18_export("parallel", tmp_path_factory)
    info = export_onnx(result.module, (x,), str(tmp_path / "r18.onnx"), deepsparse="skip")
    assert info.form == "stacked-conv" and info.verification.ok, info.verification.table()
    assert info.notes[0].startswith("form auto: 16 Sparse Parallel layers written as stacked-conv"), info.notes
    assert max(_conv_readers(onnx.load(info.path)).values()) == 2
    dense = sift.compile(torchvision.models.resnet18(), "none", 0.0, (x,)).module  # nothing to stack: no note
    assert not any("form auto" in n for n in export_onnx(dense, (x,), str(tmp_path / "d.onnx"), deepsparse="skip").notes)


@pytest.mark.deepsparse
def test_auto_form_keeps_relu_branches(tmp_path):
    """form="auto": ReLU branches stay B convs summed by Adds (fastest on idle cores), still verified."""
    from collections import OrderedDict
    net = nn.Sequential(OrderedDict(
        stem=nn.Conv2d(3, 8, 3, padding=1), act=nn.ReLU(), mid=nn.Conv2d(8, 8, 3, padding=1), bn=nn.BatchNorm2d(8),
        act2=nn.ReLU(), mid2=nn.Conv2d(8, 8, 3, padding=1), act3=nn.ReLU(), pool=nn.AdaptiveAvgPool2d(1),
        flat=nn.Flatten(), head=nn.Linear(8, 10)))
    x = torch.randn(2, 3, 12, 12)
    result = sift.compile(net, "parallel", 0.9, (x,))
    info = export_onnx(result.module, (x,), str(tmp_path / "m.onnx"), form="auto", deepsparse="require")
    assert info.form == "auto" and info.verification.ok, info.verification.table()
    model = onnx.load(info.path)
    assert sorted(_conv_readers(model).values()) == [1, 10, 10]  # the stem, then 10 branch convs per layer
    assert sum(node.op_type == "Add" for node in model.graph.node) == 2 * 9
    assert len(info.layers) == 20 and all(la.parts == 1 for la in info.layers)


@pytest.fixture(scope="module")
def bert():
    from sift_compiler.capture.sources import load_model
    torch.manual_seed(0)
    return load_model("transformers:bert,num_hidden_layers=1,hidden_size=64,num_attention_heads=4,"
                      "intermediate_size=128,vocab_size=500,max_position_embeddings=64", (1, 16))


@pytest.mark.deepsparse
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_every_transform_of_a_transformer_exports_verified(bert, transform, tmp_path):
    result = sift.compile(bert.module, transform, 0.75 if transform != "none" else 0.0, bert.args, bert.kwargs)
    info = export_onnx(result.module, bert.args, str(tmp_path / "bert.onnx"), bert.kwargs, deepsparse="require")
    assert info.verification.ok, info.verification.table()
    assert {c.name for c in info.verification.checks} == ALL_CHECKS
    assert info.input_names == ["input_ids"]
    assert (transform == "none") == (not info.layers)
    assert all(la.nnz <= min(la.mask_nnz, la.max_nnz) for la in info.layers)
    # attention and embeddings partly fall back to DeepSparse's bundled onnxruntime: reported, not hidden
    assert 0.5 < info.verification.fraction_of_supported_ops <= 1.0
    # captured by torch.export, yet the file takes any batch and sequence length
    assert not any("static input shapes" in n for n in info.notes), info.notes
    ids = onnx.load(info.path).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in ids] == ["batch", "sequence"]
    session = ort.InferenceSession(info.path, providers=["CPUExecutionProvider"])
    for shape in [(3, 9), (1, 40)]:
        tokens = torch.randint(0, 500, shape, generator=torch.Generator().manual_seed(shape[1]))
        with torch.no_grad():
            expected, = tensors(result.module.eval()(input_ids=tokens))
        got, = session.run(None, {"input_ids": tokens.numpy()})
        assert got.shape == tuple(expected.shape)
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-3, atol=1e-4 * float(expected.abs().max()))


def test_negative_zeros_from_batchnorm_folding_become_positive(tmp_path):
    conv = MaskedConv2d(2, 4, 3)
    conv.set_mask(torch.rand(conv.weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5)
    norm = nn.BatchNorm2d(4)
    norm.weight.data.fill_(-2.0)  # negative scale: +0.0 * -2 = -0.0 in the folded weight
    model = nn.Sequential(conv, norm, nn.ReLU()).eval()
    info = export_onnx(model, torch.randn(1, 2, 6, 6), str(tmp_path / "m.onnx"), deepsparse="skip")
    assert any("negative zeros (from BatchNorm folding) rewritten as +0.0" in n for n in info.notes), info.notes
    (tensor, array), = weight_arrays(onnx.load(info.path))
    assert tensor.nnz == int(conv.weight_mask.sum()) and not np.any((array == 0) & np.signbit(array))


def _small_sparse_model():
    conv = MaskedConv2d(3, 8, 3, padding=1)
    conv.target_density = 0.25
    conv.set_mask(torch.rand(conv.weight.shape, generator=torch.Generator().manual_seed(1)) < 0.25)
    return nn.Sequential(conv, nn.ReLU(), nn.Conv2d(8, 4, 1)).eval(), torch.randn(2, 3, 8, 8)


@pytest.mark.deepsparse
def test_external_data_keeps_weights_beside_the_model(tmp_path):
    from sift_compiler.cli.check import main as check_main
    model, x = _small_sparse_model()
    path = str(tmp_path / "ext.onnx")
    info = export_onnx(model, x, path, external_data=True, deepsparse="require")
    assert info.data_path == path + ".data" and os.path.getsize(path + ".data") > 1000
    assert os.path.getsize(path) < 4000  # the graph only
    assert sorted(os.listdir(tmp_path)) == ["ext.onnx", "ext.onnx.data"]
    assert info.verification.ok, info.verification.table()
    assert check_main([path, "--require-deepsparse"]) == 0


def test_weights_over_the_threshold_go_to_external_data(tmp_path, monkeypatch):
    model, x = _small_sparse_model()
    monkeypatch.setattr(onnx_exporter, "EXTERNAL_DATA_THRESHOLD", 100)  # stands in for 2 GB
    info = export_onnx(model, x, str(tmp_path / "big.onnx"), deepsparse="skip")
    assert info.data_path is not None and os.path.exists(info.data_path)
    small = export_onnx(model, x, str(tmp_path / "small.onnx"), deepsparse="skip", external_data=False)
    assert small.data_path is None and not os.path.exists(str(tmp_path / "small.onnx.data"))


def test_training_module_is_checked_in_eval_mode_and_left_as_it_was(tmp_path):
    model, x = _small_sparse_model()
    model = nn.Sequential(*model[:2], nn.BatchNorm2d(8), model[2]).train()
    model[2].running_mean.fill_(3.0)  # eval statistics differ from batch statistics
    info = export_onnx(model, x, str(tmp_path / "m.onnx"), deepsparse="skip")
    assert info.verification.ok, info.verification.table()
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("kwargs, message", [
    ({"opset": 18}, "opset 18 is not supported: use 13 to 17"),
    ({"form": "wide"}, "unknown export form 'wide'"),
    ({"fomr": "branches"}, r"unknown export options fomr: the options are the fields of ExportSettings \(opset"),
])
def test_bad_arguments_are_user_errors(tmp_path, kwargs, message):
    model, x = _small_sparse_model()
    with pytest.raises(UserInputError, match=message):
        export_onnx(model, x, str(tmp_path / "m.onnx"), **kwargs)
    with pytest.raises(UserInputError, match="does not exist"):
        export_onnx(model, x, str(tmp_path / "missing" / "m.onnx"))


def test_export_settings_are_one_frozen_object_or_its_fields(tmp_path):
    """`ExportSettings` and keywords are the same options: the same file either way, the object unchanged."""
    from sift_compiler.exporters import ExportSettings
    model, x = _small_sparse_model()
    settings = ExportSettings(opset=13, deepsparse="skip", input_names=["pixels"])
    by_object = export_onnx(model, x, str(tmp_path / "a.onnx"), settings=settings)
    by_fields = export_onnx(model, x, str(tmp_path / "b.onnx"), opset=13, deepsparse="skip", input_names=["pixels"])
    assert by_object.opset == by_fields.opset == 13 and by_object.input_names == by_fields.input_names == ["pixels"]
    assert settings.input_names == ("pixels",) and settings.form == "auto"          # frozen: no remedy changed it
    with pytest.raises(AttributeError):
        settings.opset = 17
    first, second = (onnx.load(str(tmp_path / n)) for n in ("a.onnx", "b.onnx"))
    assert [i.name for i in first.graph.input] == [i.name for i in second.graph.input] == ["pixels"]
    assert [numpy_helper.to_array(t).tobytes() for t in first.graph.initializer] == \
        [numpy_helper.to_array(t).tobytes() for t in second.graph.initializer]


class _FixedBatch(nn.Module):
    """A model that hard-codes its batch size, as some user code does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).view(1, -1))


def test_a_hard_coded_batch_size_gives_a_static_file_with_a_note(tmp_path):
    info = export_onnx(torch.fx.symbolic_trace(_FixedBatch().eval()), torch.randn(1, 3, 8, 8),
                       str(tmp_path / "fixed.onnx"), deepsparse="skip")
    assert info.verification.ok, info.verification.table()
    assert any(n.startswith("static input shapes (1, 3, 8, 8): the model does not run at (2, 3, 8, 8) in torch")
               for n in info.notes), info.notes
    dims = onnx.load(info.path).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 3, 8, 8]
    assert os.listdir(tmp_path) == ["fixed.onnx"]


class _BakedBatch(nn.Module):
    """Runs at any batch in torch, but the exporter fixes the batch: a size read through `int()`."""

    def forward(self, x):
        return x.reshape(int(x.shape[0]), -1).sum(1, keepdim=True) * x.mean()


def test_a_file_that_runs_only_at_the_example_shape_is_exported_again_with_static_shapes(tmp_path):
    info = export_onnx(_BakedBatch().eval(), torch.randn(1, 3, 4), str(tmp_path / "baked.onnx"), deepsparse="skip")
    assert info.verification.ok, info.verification.table()
    assert any(n.startswith("static input shapes (1, 3, 4): the file did not run correctly at another batch")
               for n in info.notes), info.notes
    assert [d.dim_value for d in onnx.load(info.path).graph.input[0].type.tensor_type.shape.dim] == [1, 3, 4]
    assert os.listdir(tmp_path) == ["baked.onnx"]  # the first, dynamic attempt left nothing behind


class _SizedFill(nn.Module):
    def forward(self, x):
        return x + torch.full((x.shape[0], 1), 2.0)


def test_a_size_passed_to_an_op_the_rewrite_does_not_know_gives_a_static_file_naming_the_op(tmp_path):
    from sift_compiler.exporters.dynamic_shapes import UnsupportedSizeUse, make_sizes_traceable
    batch = torch.export.Dim("batch", min=1, max=64)
    unlifted = torch.export.export(_SizedFill(), (torch.randn(2, 3),), dynamic_shapes=({0: batch},),
                                   strict=False).module()
    graph_module = torch.fx.GraphModule(unlifted, unlifted.graph)  # what capture hands on: a plain GraphModule
    with pytest.raises(UnsupportedSizeUse, match="aten.full.default"):
        make_sizes_traceable(copy.deepcopy(graph_module))
    info = export_onnx(graph_module, torch.randn(2, 3), str(tmp_path / "full.onnx"), deepsparse="skip")
    assert info.verification.ok, info.verification.table()
    assert any("passes a symbolic size to aten.full.default" in n for n in info.notes), info.notes


def test_other_shape_inputs_grow_the_batch_and_shrink_token_sequences():
    from sift_compiler.exporters.dynamic_shapes import other_shape_inputs
    image, ids, scalar = torch.randn(2, 3, 4, 4), torch.arange(10).view(2, 5), torch.tensor(1.0)
    (got_image, got_ids), kwargs = other_shape_inputs(((image, ids), {"t": scalar}))
    assert got_image.shape == (3, 3, 4, 4) and torch.equal(got_image[2], image[0])
    assert got_ids.shape == (3, 4) and torch.equal(got_ids[2], ids[0, :4])
    assert kwargs["t"] is scalar


class _SliceWrites(nn.Module):
    """Fills a fresh tensor by in-place slice writes, as DeepSeek-V3's latent attention does;
    ``leak`` also reads a view of the tensor taken before the last write (that one cannot move)."""

    def __init__(self, leak: bool = False) -> None:
        super().__init__()
        self.leak = leak

    def forward(self, x):
        out = x.new_empty(*x.shape[:-1], 6)
        head = out[..., :2]
        out[..., :2].copy_(x[..., :2] * 2)
        out[..., 2:].copy_(x[..., :1])  # broadcast over the last 4
        return (out * 1, head * 1) if self.leak else out * 1


def test_slice_writes_are_rewritten_out_of_place_with_equal_values():
    from sift_compiler.exporters.inplace_writes import rewrite_slice_writes
    x = torch.randn(2, 3, 5)
    gm = torch.export.export(_SliceWrites(), (x,)).module()
    writes = rewrite_slice_writes(gm)
    assert (writes.rewritten, writes.left) == (2, [])
    assert not [n for n in gm.graph.nodes if n.target is torch.ops.aten.copy_.default]
    assert torch.equal(gm(x), _SliceWrites()(x))
    leaky = torch.export.export(_SliceWrites(leak=True), (x,)).module()
    writes = rewrite_slice_writes(leaky)
    assert writes.rewritten == 0 and len(writes.left) == 2 and "is read after the write" in writes.left[0]
    assert all(torch.equal(a, e) for a, e in zip(leaky(x), _SliceWrites(leak=True)(x)))
