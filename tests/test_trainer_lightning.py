"""Lightning Trainer + SparsityCallback: RigL on a compiled CNN inside a LightningModule.

30 optimizer steps with gradient accumulation 2 and gradient clipping: exact per-layer counts after
every step, masks that move, grown weights and their Adam state at zero, clipping applied to the
sparse gradient, and a run resumed from the step-15 checkpoint (Lightning's ModelCheckpoint) that
ends bit for bit where the straight run ends.
"""
from __future__ import annotations

import lightning
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
import torch
import torch.nn.functional as F

import sift_compiler as sift
from sift_compiler.integrations.lightning import SparsityCallback
from test_sparsity_common import TinyCNN

STEPS, INTERVAL, BATCHES_PER_EPOCH = 30, 5, 30  # 15 optimizer steps per epoch (accumulation 2)


class Classifier(lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = sift.compile(TinyCNN(), "parallel", 0.75, (torch.randn(2, 1, 8, 8),), seed=2).module

    def training_step(self, batch, index):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _data():
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(BATCHES_PER_EPOCH * 8, 1, 8, 8, generator=gen), torch.randint(0, 10, (BATCHES_PER_EPOCH * 8,))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=False)


class Watch(lightning.Callback):
    def __init__(self, sparsity: SparsityCallback) -> None:
        self.sparsity, self.previous = sparsity, None
        self.exact, self.grown, self.off_mask_grads = [], [], []

    def on_before_zero_grad(self, trainer, pl_module, optimizer):  # right after optimizer.step()
        engine = self.sparsity.engine
        masks = {w.name: w.layer.weight_mask.clone() for w in engine.weights}
        self.exact.append(all(int(w.layer.weight_mask.sum()) == w.count and not w.param[~w.layer.weight_mask].any()
                              for w in engine.weights))
        if self.previous is not None and any(not torch.equal(masks[k], self.previous[k]) for k in masks):
            for w in engine.weights:
                grown = masks[w.name] & ~self.previous[w.name]
                moments = [v for v in optimizer.state[w.param].values() if torch.is_tensor(v) and v.shape == w.param.shape]
                self.grown.append((int(grown.sum()), bool(w.param[grown].any()), any(bool(m[grown].any()) for m in moments)))
        self.previous = masks

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # before Lightning clips
        self.off_mask_grads.append(any(bool(w.param.grad[~w.layer.weight_mask].any())
                                       for w in self.sparsity.engine.weights if w.param.grad is not None))


def _fit(tmp_path, module, callbacks, ckpt_path=None):
    trainer = lightning.Trainer(max_steps=STEPS, accumulate_grad_batches=2, gradient_clip_val=0.5,
                                accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                                enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks)
    trainer.fit(module, _data(), ckpt_path=ckpt_path)
    return trainer


def test_rigl_with_lightning_keeps_counts_moves_masks_and_resumes_exactly(tmp_path):
    lightning.seed_everything(0)
    module = Classifier()
    start = {k: v.clone() for k, v in sift.sparsity.masks(module).items()}
    sparsity = SparsityCallback("rigl", update_interval=INTERVAL)
    watch = Watch(sparsity)
    every_15 = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=15, save_top_k=-1, filename="{step}")
    _fit(tmp_path, module, [sparsity, watch, every_15])
    engine = sparsity.engine
    assert engine.schedule.total_steps == STEPS  # estimated_stepping_batches
    assert len(watch.exact) == STEPS and all(watch.exact)
    assert [h["step"] for h in engine.history] == [5, 10, 15, 20]
    assert any(not torch.equal(start[k], v) for k, v in sift.sparsity.masks(module).items())
    assert sum(count for count, _, _ in watch.grown) > 0  # connections grew...
    assert not any(weights or state for _, weights, state in watch.grown)  # ...at zero, with zero optimizer state
    assert not any(watch.off_mask_grads)  # what Lightning clips is the sparse gradient

    resumed = Classifier()
    resumed_sparsity = SparsityCallback("rigl", update_interval=INTERVAL)
    _fit(tmp_path, resumed, [resumed_sparsity], ckpt_path=tmp_path / "step=15.ckpt")
    assert resumed_sparsity.engine.history == engine.history
    final, again = module.state_dict(), resumed.state_dict()
    assert final.keys() == again.keys()
    for name, value in final.items():
        torch.testing.assert_close(again[name], value, rtol=0, atol=0, msg=name)


def test_unknown_method_is_refused_before_training():
    with pytest.raises(sift.UserInputError, match="choose one of static, set, rigl"):
        SparsityCallback("magnitude")
