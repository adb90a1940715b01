"""save/load: a compiled model comes back in a fresh process, trainable, with its masks."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import sift_compiler as sift
from sift_compiler.capture.sources import load_model
from sift_compiler.errors import ModelLoadError


def test_roundtrip_in_a_fresh_process(tmp_path):
    source = load_model("torchvision:resnet18", input_shape=(1, 3, 32, 32))
    result = sift.compile(source.module, "factorized", 0.75, source.args,
                          source={"spec": "torchvision:resnet18", "family": "torchvision"})
    path = tmp_path / "r18.sift.pt"
    result.save(str(path))
    x = torch.randn(2, 3, 32, 32)
    result.module.eval()
    with torch.no_grad():
        torch.save({"x": x, "y": result.module(x), "masks": sift.sparsity.masks(result.module)}, tmp_path / "ref.pt")
    script = textwrap.dedent(f"""
        import torch, sift_compiler as sift
        ref = torch.load({str(tmp_path / 'ref.pt')!r})
        result = sift.load({str(path)!r})
        masks = sift.sparsity.masks(result.module)
        assert masks.keys() == ref["masks"].keys()
        assert all(torch.equal(masks[k], ref["masks"][k]) for k in masks)
        result.module.eval()
        with torch.no_grad():
            torch.testing.assert_close(result.module(ref["x"]), ref["y"])
        result.module.train()
        result.module(ref["x"]).sum().backward()
        assert abs(result.report.flop_ratio - 1) < 0.005
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_saved_file_is_plain_data(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 2))
    result = sift.compile(model, "parallel", 0.5, (torch.randn(1, 4),))
    path = tmp_path / "m.sift.pt"
    result.save(str(path))
    content = torch.load(path, weights_only=True)  # no code can run
    assert content["format"] == "sift-compiler/1" and content["plan"]["config"]["transform"] == "parallel"
    with pytest.raises(ModelLoadError, match="model=dense_model"):
        sift.load(str(path))
    loaded = sift.load(str(path), model=model)
    assert all(torch.equal(a, b) for a, b in zip(loaded.module.state_dict().values(),
                                                 result.module.state_dict().values()))


def test_callable_source_needs_trust(tmp_path):
    result = sift.compile(torch.nn.Linear(2, 2), "none", 0.0, (torch.randn(1, 2),),
                          source={"spec": "os:getcwd", "family": "callable"})
    path = tmp_path / "m.sift.pt"
    result.save(str(path))
    with pytest.raises(ModelLoadError, match="trust_source=True"):
        sift.load(str(path))
