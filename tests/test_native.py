"""The compiled model is the user's own model (issue 10): class, forward code, module tree, methods.

The model matrix (tests/test_transforms_models.py) checks every transform on real architectures
in the native form; here: what only the native form can do, and what makes it fall back.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import sift_compiler as sift
from sift_compiler.errors import UserInputError
from sift_compiler.native import relative_error
from checks import exit_status, tensors
from model_zoo import MODELS

LLAMA = MODELS["llama"]


def _llama_wide(seed: int = 0):
    case = LLAMA()
    return case, sift.compile(case.model, "wide", 0.75, (), case.kwargs, seed=seed)


def test_hugging_face_model_stays_one_loss_generate_and_cache():
    """labels= gives the loss the graph form's logits give; generate() with its KV cache decodes
    what a full recompute decodes; the user's model and its config are untouched."""
    case, result = _llama_wide()
    model = result.module.eval()
    assert type(model) is type(case.model) and result.output == "native"
    assert model.config.use_cache and case.model.config.use_cache  # compiled with the cache on, left on
    ids = case.kwargs["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
        logits = result.graph_module.eval()(input_ids=ids).logits
    expected = nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)

    prompt = ids[:, :5]
    generated = model.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    recomputed = prompt
    with torch.no_grad():
        for _ in range(8):
            step = model(input_ids=recomputed, use_cache=False).logits[:, -1:].argmax(-1)
            recomputed = torch.cat([recomputed, step], 1)
    assert torch.equal(generated, recomputed)
    assert not any(isinstance(m, sift.sparsity.MaskedLayer) for m in case.model.modules())


def test_save_pretrained_and_load_in_a_fresh_process(tmp_path):
    """save_pretrained writes safetensors (weights and masks) and the plan in config.json;
    sift.load(dir) in a fresh process gives the same outputs and masks, running no code from the files."""
    case, result = _llama_wide(seed=3)
    directory = tmp_path / "llama-wide"
    result.module.save_pretrained(directory)
    assert (directory / "model.safetensors").exists()
    ids = torch.randint(0, 500, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = result.module.eval()(input_ids=ids).logits
    torch.save({"ids": ids, "logits": reference, "masks": sift.sparsity.masks(result.module)}, tmp_path / "ref.pt")
    script = textwrap.dedent(f"""
        import torch, sift_compiler as sift
        ref = torch.load({str(tmp_path / 'ref.pt')!r})
        result = sift.load({str(directory)!r})
        assert type(result.module).__name__ == "LlamaForCausalLM" and result.output == "native"
        masks = sift.sparsity.masks(result.module)
        assert masks.keys() == ref["masks"].keys()
        assert all(torch.equal(masks[k], ref["masks"][k]) for k in masks)
        with torch.no_grad():
            torch.testing.assert_close(result.module.eval()(input_ids=ref["ids"]).logits, ref["logits"])
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


def test_native_and_graph_hold_the_same_weights_and_masks_for_a_seed():
    case = MODELS["resnet18"]()
    native = sift.compile(case.model, "parallel", 0.75, case.args, seed=5)
    graph = sift.compile(case.model, "parallel", 0.75, case.args, seed=5, output="graph")
    assert native.output == "native" and graph.output == "graph"
    assert isinstance(graph.module, torch.fx.GraphModule) and type(native.module) is type(case.model)
    a, b = native.module.state_dict(), graph.module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert native.report.to_dict() == graph.report.to_dict() | {"notes": native.report.notes}
    # and they share them: one object per tensor, whichever form is trained
    assert {id(p) for p in native.module.parameters()} == {id(p) for p in native.graph_module.parameters()}


def test_block_hooks_fire_in_the_native_model():
    """FSDP, activation checkpointing and PEFT hook blocks; a GraphModule never runs a block's forward."""
    case = MODELS["resnet18"]()
    result = sift.compile(case.model, "wide", 0.75, case.args)
    calls = []
    result.module.layer2[0].register_forward_hook(lambda *_: calls.append("block"))
    result.module(*case.args)
    assert calls == ["block"]


def test_library_modules_no_rewrite_touched_are_given_back():
    """GPT-2's Conv1D is captured as a Linear; the layers a transform leaves alone are Conv1D again."""
    from transformers.pytorch_utils import Conv1D
    case = MODELS["gpt2"]()
    dense = sift.compile(case.model, "none", 0.0, (), case.kwargs)
    assert type(dense.module.transformer.h[0].attn.c_attn) is Conv1D
    kept = sift.compile(case.model, "parallel", 0.75, (), case.kwargs, keep_dense=("*.mlp.*",))
    assert type(kept.module.transformer.h[0].mlp.c_fc) is Conv1D
    assert isinstance(kept.module.transformer.h[0].attn.c_attn, sift.passes.ParallelBranches)


class HardCodedWidth(nn.Module):
    """A block whose forward writes its width as a literal: Sparse Wide cannot widen it natively."""

    def __init__(self):
        super().__init__()
        self.stem, self.mid, self.head = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x):
        h = torch.relu(self.mid(torch.relu(self.stem(x))))
        return self.head(h.view(-1, 2, 16).flatten(1))  # the literal 16 is half the width


def test_a_literal_size_keeps_the_graph_form_and_names_the_line(tmp_path):
    x = torch.randn(2, 8)
    result = sift.compile(HardCodedWidth(), "wide", 0.75, (x,))
    assert result.output == "graph" and isinstance(result.module, torch.fx.GraphModule)
    note = next(n for n in result.report.notes if n.startswith("graph form returned"))
    assert "literal 16" in note and "test_native.py:" in note and "in forward" in note
    with pytest.raises(UserInputError, match="literal 16"):
        sift.compile(HardCodedWidth(), "wide", 0.75, (x,), output="native")
    from sift_compiler.cli.compile import main
    assert exit_status(main, ["test_native:HardCodedWidth", "-t", "wide", "-s", "0.75", "--input-shape", "2,8",
                              "--output-form", "native"]) == 2


def test_a_functional_linear_on_a_parameter_keeps_the_graph_form():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.head = nn.Linear(8, 16), nn.Linear(16, 4)
            self.w = nn.Parameter(torch.randn(16, 16) / 4)

        def forward(self, x):
            return self.head(torch.relu(nn.functional.linear(torch.relu(self.stem(x)), self.w)))

    result = sift.compile(Functional(), "parallel", 0.75, (torch.randn(2, 8),))
    assert result.output == "graph"
    assert any("functional call on parameters" in n and "test_native.py:" in n for n in result.report.notes)


def test_new_modules_start_as_the_model_initialises_its_own():
    """Hugging Face: N(0, initializer_range) for new Linear layers (on the active weights); timm's
    zero-initialised last BatchNorm of each residual block stays zero when Sparse Wide widens it."""
    case, result = _llama_wide()
    layer = result.module.model.layers[0].mlp.gate_proj
    active = layer.weight[layer.weight_mask]
    assert active.std().item() == pytest.approx(case.model.config.initializer_range, rel=0.1)
    assert active.abs().max().item() < 6 * case.model.config.initializer_range  # not U(+-1/sqrt(fan_in))

    import timm
    model = timm.create_model("botnet26t_256", img_size=64, pretrained=False)
    zero = [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and not m.weight.any()]
    assert zero  # timm's zero_init_last
    wide = sift.compile(model, "wide", 0.75, (torch.randn(1, 3, 64, 64),)).module
    widened = {name: m for name, m in wide.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert all(widened[name].num_features > dict(model.named_modules())[name].num_features for name in zero)
    assert all(not widened[name].weight.any() for name in zero)


@pytest.mark.parametrize("name", ["timm_vit_tiny", "bert"])
def test_attention_width_scale_is_native_too(name):
    """With head_dim widened, the modules' own size and scale attributes follow the graph's."""
    case = MODELS[name]()
    result = sift.compile(case.model, "wide", 0.75, case.args, case.kwargs, attention_width="scale")
    assert result.output == "native", result.report.notes
    other = [torch.cat([t, t[:1]]) if isinstance(t, torch.Tensor) else t for t in case.args]
    other_kwargs = {k: torch.cat([v, v[:1]]) for k, v in case.kwargs.items()}
    with torch.no_grad():
        error = relative_error(tensors(result.module.eval()(*other, **other_kwargs)),
                               tensors(result.graph_module.eval()(*other, **other_kwargs)))
    assert error <= 1e-5
