"""Transposable N:M masks: construction, the check, and regrowth that keeps the pattern."""
import pytest
import torch

import sift_compiler as sift
from sift_compiler.errors import UserInputError
from sift_compiler.sparsity.nm import check_nm, regrow_nm, to_blocks, from_blocks
from test_sparsity_common import assert_exact, batches, compiled, train


@pytest.mark.parametrize("n", [4, 2, 1], ids=["4:8-T", "2:8-T", "1:8-T"])
def test_random_mask_is_transposable_nm(n):
    gen = torch.Generator().manual_seed(0)
    mask = sift.sparsity.random_nm_mask((32, 16, 3, 3), n, 8, gen)
    blocks = to_blocks(mask.int(), 8)
    assert (blocks.sum(-1) == n).all() and (blocks.sum(-2) == n).all()
    assert int(mask.sum()) == mask.numel() * n // 8
    assert sift.sparsity.is_transposable_nm(mask, n, 8)
    assert torch.equal(from_blocks(to_blocks(mask, 8), tuple(mask.shape), 8), mask)


def test_check_rejects_plain_nm_that_is_not_transposable():
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[:, :2] = True                      # 2 per row, but columns 0/1 hold 8 and the rest 0
    assert not sift.sparsity.is_transposable_nm(mask, 2, 8)
    assert not sift.sparsity.is_transposable_nm(torch.ones(6, 8, dtype=torch.bool), 2, 8)  # 6 rows


@pytest.mark.parametrize("n", [4, 2, 1])
def test_regrow_keeps_kept_positions_and_the_pattern(n):
    gen = torch.Generator().manual_seed(1)
    old = sift.sparsity.random_nm_mask((64, 72), n, 8, gen)
    for trial in range(5):
        weight = torch.randn(64, 72, generator=gen)
        count = int(old.sum())
        score = torch.where(old, weight.abs(), torch.tensor(-1.0))
        kept = torch.zeros(old.numel(), dtype=torch.bool)
        kept[score.flatten().topk(count - int(0.3 * count)).indices] = True
        kept = kept.view_as(old)
        new, reverted = regrow_nm(kept, torch.rand(64, 72, generator=gen), old, n, 8)
        assert sift.sparsity.is_transposable_nm(new, n, 8) and int(new.sum()) == count
        assert bool((new | ~kept).all())           # every kept position stays
        assert reverted <= 2                        # the greedy fill plus repair rarely gives up on a block
        old = new


def test_regrow_prefers_high_scores():
    """With one block emptied of a row's and a column's worth, the best-scoring feasible cells return."""
    old = torch.eye(8, dtype=torch.bool) | torch.eye(8, dtype=torch.bool).roll(1, 1)   # 2:8-T
    kept = old.clone()
    kept[0, 0] = False                                # row 0 and column 0 now lack one
    scores = torch.zeros(8, 8)
    scores[0, 0] = 5.0
    new, reverted = regrow_nm(kept, scores, old, 2, 8)
    assert reverted == 0 and new[0, 0] and sift.sparsity.is_transposable_nm(new, 2, 8)


@pytest.mark.parametrize("method", ["static", "set", "rigl"])
def test_engines_replace_unstructured_masks_with_nm_and_keep_weights_alive(method):
    module = compiled(0.875)
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    kw = dict(pattern="nm", n=1, m=8)
    engine = (sift.sparsity.Static(module, opt, **kw) if method == "static" else
              getattr(sift.sparsity, method.upper() if method == "set" else "RigL")(
                  module, opt, total_steps=12, update_interval=3, **kw))
    for w in engine.weights:
        # positions the N:M mask opened got fresh (non-zero) weights, not the zeros compile left there
        assert int((w.param != 0).sum()) == w.count
    train(module, opt, engine, batches(12), lambda step: assert_exact(module, engine, 1, 8))


def test_check_nm_messages():
    with pytest.raises(UserInputError, match="N <= M"):
        check_nm(9, 8)
    with pytest.raises(UserInputError, match="outside"):
        check_nm(8, 8)
