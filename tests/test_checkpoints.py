"""Checkpoint folders (issue 17): standard (plain transformers), compact (values + bitmask), refusals.

The standard folder is loaded by a fresh process that never imports sift; `sift.load` on the same
folder must give back the masks, trainable.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn as nn

import sift_compiler as sift
from sift_compiler.errors import SiftWarning
from sift_compiler.exporters.checkpoints import COMPACT_FILE, StandardCheckpointRefused
from sift_compiler.exporters.compact import pack_bits, unpack_bits
from sift_compiler.passes.sparse_wide import kernel_head_dim
from sift_compiler.sparsity.nm import random_nm_mask
from checks import exit_status
from model_zoo import _spec

TINY = "num_hidden_layers=2,hidden_size=64,num_attention_heads=4,num_key_value_heads=2,intermediate_size=128," \
       "max_position_embeddings=64"
LMS = {  # name: (model, Sparse Wide options, hidden and FFN sizes of the standard config)
    "llama": (_spec(f"transformers:llama,{TINY},vocab_size=500", (1, 16)), {}, (128, 256)),
    "qwen2": (_spec(f"transformers:qwen2,{TINY},vocab_size=500", (1, 16)), {}, (128, 256)),
    # the attention width scales with n_embd, as GPT-2's config says; its Conv1D layers are transposed back
    "gpt2": (_spec("transformers:gpt2,n_layer=1,n_embd=64,n_head=4,vocab_size=500,n_positions=32", (1, 8)),
             {"attention_width": "scale"}, (128, 512)),
}


def _compile(case, transform="wide", sparsity=0.75, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SiftWarning)
        return sift.compile(case.model, transform, sparsity, (), case.kwargs, **options)


def _logits(module, ids):
    with torch.no_grad():
        return module.eval()(input_ids=ids).logits


def test_sparse_wide_standard_checkpoint_loads_in_plain_transformers_and_back_in_sift(tmp_path):
    """Llama, Qwen2 (which derives head_dim from hidden_size, so the config must write it) and
    GPT-2 (Conv1D weights, n_inner derived unless written): a fresh process with transformers alone gets the sift model's logits; sift.load restores the
    masks, a RigL update on them keeps every layer's count exact, and the trained model saves again."""
    ids = torch.randint(0, 500, (2, 11), generator=torch.Generator().manual_seed(1))
    results = {}
    for name, (build, options, _) in LMS.items():
        result = _compile(build(), seed=2, **options)
        assert result.save_pretrained(tmp_path / name, format="standard") == "standard"
        torch.save(_logits(result.module, ids), tmp_path / f"{name}.pt")
        results[name] = result
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        ids = torch.tensor({ids.tolist()})
        for name in {list(LMS)}:
            model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + "/" + name).eval()
            with torch.no_grad():
                logits = model(input_ids=ids).logits
            expected = torch.load({str(tmp_path)!r} + "/" + name + ".pt")
            error = float((logits - expected).abs().max() / expected.abs().max())
            assert error <= 1e-5, (name, error)
            ffn = getattr(model.config, "intermediate_size", None) or model.config.n_inner or 4 * model.config.n_embd
            print(name, type(model).__name__, model.config.hidden_size, ffn)
        assert "sift_compiler" not in sys.modules
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=""))
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr[-3000:]
    for name, (_, _, (hidden, ffn)) in LMS.items():
        assert f"{name} {type(results[name].module).__name__} {hidden} {ffn}" in run.stdout

    loaded = sift.load(str(tmp_path / "qwen2"))
    masks = {k: m.clone() for k, m in sift.sparsity.masks(loaded.module).items()}
    before = sift.sparsity.masks(results["qwen2"].module)
    assert masks.keys() == before.keys() and all(torch.equal(masks[k], before[k]) for k in masks)
    torch.testing.assert_close(_logits(loaded.module, ids), _logits(results["qwen2"].module, ids), rtol=0, atol=0)
    model = loaded.module.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = sift.sparsity.RigL(model, optimizer, total_steps=4, update_interval=1)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    engine.step()
    after = sift.sparsity.masks(model)
    assert all(int(after[k].sum()) == int(masks[k].sum()) for k in after)
    assert any(not torch.equal(after[k], masks[k]) for k in after)  # the update did move masks

    # the trained model alone (as Trainer holds it) saves the same way; transformers reads it
    from transformers import AutoModelForCausalLM
    assert sift.save_pretrained(model, tmp_path / "trained", format="standard") == "standard"
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "trained")
    expected = _logits(model, ids)
    assert float((_logits(plain, ids) - expected).abs().max() / expected.abs().max()) <= 1e-5


@pytest.mark.parametrize("transform", ["parallel", "factorized", "doped"])
def test_standard_checkpoint_refused_for_blocks_no_config_describes(tmp_path, transform):
    """One line with the reason; format="auto" keeps the sift format and warns with that reason."""
    case = _spec("transformers:llama,num_hidden_layers=1,hidden_size=32,num_attention_heads=2,intermediate_size=64,"
                 "vocab_size=100,max_position_embeddings=32", (1, 8))()
    result = _compile(case, transform, 0.5)
    with pytest.raises(StandardCheckpointRefused) as refused:
        result.save_pretrained(tmp_path / "standard", format="standard")
    message = str(refused.value)
    assert "\n" not in message and repr(transform) in message and "config" in message
    assert not (tmp_path / "standard").exists()
    with pytest.warns(SiftWarning, match="standard checkpoint refused"):
        assert result.save_pretrained(tmp_path / "auto") == "sift"
    assert "sift" in json.loads((tmp_path / "auto" / "config.json").read_text())  # sift.load reads it


class MLP(nn.Module):
    """Hidden layers that dominate the weights, so the compact ratio shows."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                 nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4))

    def forward(self, x):
        return self.net(x)


def _bytes(directory) -> int:
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory) if f.endswith(".safetensors"))


def _dense_masked_bytes(result, path) -> int:
    """The dense-masked file: every tensor as it is (weights and bool masks)."""
    from safetensors.torch import save_file
    state = {k: v.contiguous() for k, v in result.module.state_dict().items()}
    save_file(state, str(path))
    return os.path.getsize(path)


@pytest.mark.parametrize("transform", ["wide", "parallel", "factorized", "doped"])
def test_compact_checkpoint_round_trip_every_transform(tmp_path, transform):
    torch.manual_seed(0)
    dense, x = MLP(), torch.randn(3, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SiftWarning)
        result = sift.compile(dense, transform, 0.9, (x,))
    assert result.save_pretrained(tmp_path / "c", format="compact") == "compact"
    assert sorted(os.listdir(tmp_path / "c")) == [COMPACT_FILE, "sift_plan.json"]
    loaded = sift.load(str(tmp_path / "c"), model=MLP())
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), result.module(x), rtol=0, atol=0)
    masks, before = sift.sparsity.masks(loaded.module), sift.sparsity.masks(result.module)
    assert masks.keys() == before.keys() and all(torch.equal(masks[k], before[k]) for k in masks)
    ratio = _bytes(tmp_path / "c") / _dense_masked_bytes(result, tmp_path / "dense.safetensors")
    print(f"{transform}: compact / dense-masked = {ratio:.3f}")
    if transform == "wide":  # all weight in sparse layers; Doped's dense U, V and Parallel's norms stay dense
        assert ratio < 0.15


def test_compact_checkpoint_of_a_language_model(tmp_path):
    """Unstructured at 0.9: equal logits, the masks back bit for bit, well under a quarter of the
    dense-masked file (the embeddings and the head stay dense)."""
    case = _spec(f"transformers:llama,{TINY},vocab_size=32", (1, 16))()
    ids = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(0))
    result = _compile(case, "wide", 0.9)
    assert result.save_pretrained(tmp_path / "c", format="compact") == "compact"
    loaded = sift.load(str(tmp_path / "c"))
    torch.testing.assert_close(_logits(loaded.module, ids), _logits(result.module, ids), rtol=0, atol=0)
    masks, before = sift.sparsity.masks(loaded.module), sift.sparsity.masks(result.module)
    assert masks.keys() == before.keys() and all(torch.equal(masks[k], before[k]) for k in masks)
    ratio = _bytes(tmp_path / "c") / _dense_masked_bytes(result, tmp_path / "dense.safetensors")
    print(f"tiny Llama, s = 0.9: compact / dense-masked = {ratio:.3f}")
    assert ratio < 0.25


def test_compact_checkpoint_of_2_4_masks(tmp_path):
    """2:4 masks (density 0.5) round trip as values + bitmask, still 2:4, about 0.44 of the file."""
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    result = sift.compile(MLP(), "wide", 0.5, (x,), round_to=8)
    generator = torch.Generator().manual_seed(3)
    for _, layer in sift.sparsity.iter_masked(result.module):
        mask = random_nm_mask(tuple(layer.weight.shape), 2, 4, generator)
        with torch.no_grad():
            layer.weight.mul_(mask)
        layer.install_mask(mask)
    assert result.save_pretrained(tmp_path / "c", format="compact") == "compact"
    loaded = sift.load(str(tmp_path / "c"), model=MLP())
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), result.module(x), rtol=0, atol=0)
    for name, layer in sift.sparsity.iter_masked(loaded.module):
        assert sift.sparsity.is_transposable_nm(layer.weight_mask, 2, 4), name
        assert torch.equal(layer.weight_mask, result.module.get_submodule(name).weight_mask)
    ratio = _bytes(tmp_path / "c") / _dense_masked_bytes(result, tmp_path / "dense.safetensors")
    print(f"MLP, 2:4: compact / dense-masked = {ratio:.3f}")
    assert ratio < 0.5


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (4, 4, 3, 3)])
def test_bitmask_packing_round_trips(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(len(shape))) < 0.3
    bits = pack_bits(mask)
    assert bits.dtype == torch.uint8 and bits.numel() == (mask.numel() + 7) // 8
    assert torch.equal(unpack_bits(bits, shape), mask)


@pytest.mark.parametrize("target,multiple,expected", [
    (64 * 2 ** 0.5, 1, 96),     # 90.5: the nearest preferred size within 12.5%
    (64 * 2, 1, 128),
    (64 * 10 ** 0.5, 1, 192),   # 202.4
    (128 * 10 ** 0.5, 1, 256),  # 404.8: no kernel takes more than 256
    (16 * 2 ** 0.5, 1, 24),     # 22.6: no preferred size near, the nearest multiple of 8
    (50.0, 3, 48),              # a multiple the solver asks for as well
])
def test_kernel_head_dim(target, multiple, expected):
    chosen = kernel_head_dim(target, multiple)
    assert chosen == expected and chosen % 8 == 0 and chosen % multiple == 0 and chosen <= 256


def test_cli_kernel_head_dims_and_a_compact_checkpoint(tmp_path, capsys):
    """GPT-2 with the attention width scaled: head dim 16 * sqrt 2 = 22.6 becomes 24 (23 without the
    option), the report says so; the compact folder loads back. A standard folder is refused in one
    line: GPT-2's config ties the attention width to n_embd (92 here), and its Conv1D layers
    became Linears."""
    from sift_compiler.cli.compile import main
    spec = "transformers:gpt2,n_layer=1,n_embd=64,n_head=4,vocab_size=100,n_positions=32"
    argv = [spec, "-t", "wide", "-s", "0.5", "--attention-width", "scale", "--kernel-head-dims", "--input-shape",
            "1,8", "-q", "--report", tmp_path / "r.json", "--save-pretrained", tmp_path / "ckpt",
            "--checkpoint-format", "compact"]
    assert exit_status(main, argv) == 0
    notes = json.loads((tmp_path / "r.json").read_text())["notes"]
    assert "head dims for attention kernels: 16->24 (k x 16 = 22.6)" in notes
    loaded = sift.load(str(tmp_path / "ckpt"))
    attention = loaded.module.transformer.h[0].attn
    assert attention.head_dim == 24 and attention.split_size == 96
    capsys.readouterr()
    assert exit_status(main, argv[:-2] + ["--checkpoint-format", "standard"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "no GPT2LMHeadModel config has the compiled model's shapes" in errors[0], errors
