"""2:4 Sparse Wide: compiled with pattern="2:4", kept 2:4 by training, swapped for torch's
semi-structured weights on CUDA (the swap's plan and refusals are checked on CPU; the GPU
numbers come from benchmarks/sparse24_gpu.py)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sift_compiler as sift
from sift_compiler.deploy import is_two_four, semi_structured_plan, to_semi_structured
from sift_compiler.errors import UserInputError
from sift_compiler.sparsity import is_transposable_nm


class MLPStack(nn.Module):
    """Embedding-like input, two GPT-2-style MLP blocks (d -> 4d -> d, residual), head."""

    def __init__(self, d: int = 32, blocks: int = 2) -> None:
        super().__init__()
        self.inp = nn.Linear(16, d)
        self.up = nn.ModuleList(nn.Linear(d, 4 * d) for _ in range(blocks))
        self.down = nn.ModuleList(nn.Linear(4 * d, d) for _ in range(blocks))
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        h = self.inp(x)
        for up, down in zip(self.up, self.down):
            h = h + down(F.gelu(up(h)))
        return self.head(h)


def compile24(round_to: int = 1, **options):
    torch.manual_seed(0)
    return sift.compile(MLPStack(), "wide", 0.5, (torch.randn(4, 16),), pattern="2:4", round_to=round_to, **options)


def sparse_masks(module):
    return {name: layer.weight_mask for name, layer in sift.sparsity.iter_masked(module) if layer.target_density < 1}


def test_compile_gives_transposable_2_4_masks_at_k_sqrt2():
    result = compile24()
    masks = sparse_masks(result.module)
    assert len(masks) == 4
    for name, mask in masks.items():
        assert is_transposable_nm(mask, 2, 4) and is_two_four(mask), name
        assert mask.shape[0] % 4 == 0 and mask.shape[1] % 4 == 0
    assert result.config.channel_multiple == 4 and result.config.round_to == 1 and result.config.nm == (2, 4)
    up = result.module.up[0]
    assert up.in_features == 44 and up.out_features == 180   # 32 * sqrt 2 = 45.3 -> 44; 128 * sqrt 2 = 181 -> 180
    assert any("pattern 2:4" in note for note in result.report.notes)


def test_pattern_refusals():
    with pytest.raises(UserInputError, match="fixes the sparsity at 0.5"):
        sift.CompileConfig(transform="wide", sparsity=0.75, pattern="2:4")
    with pytest.raises(UserInputError, match="unknown mask pattern"):
        sift.CompileConfig(transform="wide", sparsity=0.5, pattern="2-4")
    with pytest.raises(UserInputError, match="needs a Sparse-IFT transform"):
        sift.CompileConfig(transform="none", sparsity=0.5, pattern="2:4")
    with torch.device("meta"):
        meta_model = MLPStack()
    with pytest.raises(UserInputError, match="not supported on the meta device"):
        sift.compile(meta_model, "wide", 0.5, (torch.randn(4, 16, device="meta"),), pattern="2:4")


@pytest.mark.parametrize("method", ["static", "rigl"])
def test_masks_stay_2_4_through_50_training_steps(method):
    module = compile24().module
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)
    engine = sift.sparsity.Static(module, optimizer, pattern="2:4") if method == "static" else \
        sift.sparsity.RigL(module, optimizer, total_steps=50, update_interval=5, drop_fraction=0.3, pattern="2:4")
    start = {k: v.clone() for k, v in sparse_masks(module).items()}
    gen = torch.Generator().manual_seed(1)
    for _ in range(50):
        x, y = torch.randn(32, 16, generator=gen), torch.randint(0, 10, (32,), generator=gen)
        F.cross_entropy(module(x), y).backward()
        optimizer.step()
        engine.step()
        optimizer.zero_grad()
        for name, mask in sparse_masks(module).items():
            assert is_transposable_nm(mask, 2, 4), f"{name} lost 2:4-T at step {engine.step_count}"
    masks = sparse_masks(module)
    for name, mask in masks.items():
        layer = module.get_submodule(name)
        assert not bool(layer.weight[~mask].any()), f"{name}: weights off the mask"
    changed = sum(int((masks[k] != start[k]).sum()) for k in masks)
    assert (changed > 0) == (method == "rigl")           # RigL moved weights, Static kept its masks


def test_plan_names_the_swapped_layers_and_the_shape_rule():
    small = semi_structured_plan(compile24().module)
    assert sorted(p.name for p in small) == ["down.0", "down.1", "up.0", "up.1"]
    assert all(not p.swapped and "not a multiple of" in p.reason and "round_to=" in p.reason for p in small)
    plan = semi_structured_plan(compile24(round_to=64).module)
    assert len(plan) == 4 and all(p.swapped and p.kind == "linear" for p in plan), [p.reason for p in plan]
    assert {p.shape for p in plan} == {(192, 64), (64, 192)}


def test_plan_refuses_unstructured_masks():
    torch.manual_seed(0)
    module = sift.compile(MLPStack(), "wide", 0.5, (torch.randn(4, 16),), round_to=64).module
    plan = semi_structured_plan(module)
    assert plan and all("not 2:4" in p.reason for p in plan)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal is checked where there is no CUDA")
def test_swap_refuses_on_cpu_with_the_reason():
    module = compile24(round_to=64).module.half()
    with pytest.raises(UserInputError, match=r"torch.cuda.is_available\(\) is False"):
        to_semi_structured(module)


def test_saved_model_keeps_2_4_and_the_same_plan(tmp_path):
    """What is saved is the masked model; the swap is redone after loading (see sift_compiler.deploy)."""
    result = compile24(round_to=64)
    path = str(tmp_path / "m24.sift.pt")
    sift.save(result, path)
    loaded = sift.load(path, model=MLPStack())
    module = getattr(loaded, "module", loaded)
    assert module.sift_config.pattern == "2:4"
    for name, mask in sparse_masks(module).items():
        assert torch.equal(mask, sparse_masks(result.module)[name]) and is_two_four(mask)
    assert [(p.name, p.shape, p.reason) for p in semi_structured_plan(module)] == \
        [(p.name, p.shape, p.reason) for p in semi_structured_plan(result.module)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.cuda.is_available() is False: no CUDA device here "
                    "(benchmarks/sparse24_gpu.py runs the GPU path)")
def test_swap_on_cuda_matches_the_masked_model():
    module = compile24(round_to=64).module.cuda().half().eval()
    x = torch.randn(128, 16, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        expected = module(x)
        swapped = to_semi_structured(module)
        got = swapped(x)
    assert all(type(swapped.get_submodule(p.name)) is nn.Linear for p in semi_structured_plan(compile24(64).module))
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
