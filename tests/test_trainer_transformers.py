"""Hugging Face Trainer + SparsityCallback: RigL on a compiled tiny Llama, trained by the real Trainer.

30 optimizer steps (gradient accumulation 2, an update every 5 steps): exact per-layer counts
after every step, masks that move, grown weights and their AdamW state at zero, the gradient norm
Trainer clips is the sparse gradient's, and a run resumed from the step-15 checkpoint ends where
the straight run ends, bit for bit.
"""
from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import sift_compiler as sift
from sift_compiler.integrations.transformers import STATE_FILE, SparsityCallback
from model_zoo import MODELS

STEPS, INTERVAL = 30, 5


class Tokens(torch.utils.data.Dataset):
    def __init__(self, count: int = 64, length: int = 16) -> None:
        self.ids = torch.randint(0, 500, (count, length), generator=torch.Generator().manual_seed(7))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Watch(TrainerCallback):
    """After the sparsity callback's step: counts, grown weights and state; before each optimizer
    step: the norm of the gradients Trainer just clipped (clipping is off: it reports the norm)."""

    def __init__(self, sparsity: SparsityCallback) -> None:
        self.sparsity, self.previous = sparsity, None
        self.exact, self.grown, self.norms = [], [], []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        masks = {id(w.param): w.layer.weight_mask for w in self.sparsity.engine.weights}
        grads = [p.grad * masks[id(p)] if id(p) in masks else p.grad for p in model.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        engine = self.sparsity.engine
        masks = {w.name: w.layer.weight_mask.clone() for w in engine.weights}
        self.exact.append(all(int(w.layer.weight_mask.sum()) == w.count and not w.param[~w.layer.weight_mask].any()
                              for w in engine.weights))
        if self.previous is not None and any(not torch.equal(masks[k], self.previous[k]) for k in masks):
            state_of = getattr(optimizer, "optimizer", optimizer).state
            for w in engine.weights:
                grown = masks[w.name] & ~self.previous[w.name]
                moments = [v for v in state_of[w.param].values() if torch.is_tensor(v) and v.shape == w.param.shape]
                self.grown.append((int(grown.sum()), bool(w.param[grown].any()), any(bool(m[grown].any()) for m in moments)))
        self.previous = masks


def _trainer(output_dir, callbacks, steps=STEPS):
    torch.manual_seed(0)
    case = MODELS["llama"]()
    result = sift.compile(case.model, "wide", 0.75, (), case.kwargs, seed=1)
    assert result.output == "native"
    args = TrainingArguments(output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, learning_rate=3e-3, max_grad_norm=1e9, save_steps=15,
                             logging_steps=1, report_to=[], use_cpu=True, seed=3, dataloader_num_workers=0,
                             disable_tqdm=True, save_only_model=False)
    return Trainer(model=result.module, args=args, train_dataset=Tokens(), callbacks=callbacks)


def test_rigl_with_the_trainer_keeps_counts_moves_masks_and_resumes_exactly(tmp_path):
    sparsity = SparsityCallback("rigl", update_interval=INTERVAL)
    watch = Watch(sparsity)
    trainer = _trainer(tmp_path, [sparsity, watch])
    start = {k: v.clone() for k, v in sift.sparsity.masks(trainer.model).items()}
    trainer.train()
    engine = sparsity.engine
    assert engine.schedule.total_steps == STEPS  # the Trainer's planned optimizer steps
    assert len(watch.exact) == STEPS and all(watch.exact)
    assert [h["step"] for h in engine.history] == [5, 10, 15, 20]  # until 75% of 30
    assert any(not torch.equal(start[k], v) for k, v in sift.sparsity.masks(trainer.model).items())
    assert sum(count for count, _, _ in watch.grown) > 0  # connections grew...
    assert not any(weights or state for _, weights, state in watch.grown)  # ...at zero, with zero optimizer state
    # the norm Trainer computed for clipping is the masked gradient's, on update steps too (where RigL
    # collects the dense gradient: a dense weight.grad there would give a larger norm)
    logged = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    assert len(logged) == STEPS and logged == pytest.approx(watch.norms, rel=1e-5)
    checkpoint = tmp_path / "checkpoint-15"
    assert (checkpoint / STATE_FILE).exists() and (checkpoint / "model.safetensors").exists()
    final = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    resumed_sparsity = SparsityCallback("rigl", update_interval=INTERVAL)
    resumed = _trainer(tmp_path, [resumed_sparsity])
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed_sparsity.engine.history == engine.history
    again = resumed.model.state_dict()
    assert final.keys() == again.keys()
    for name, value in final.items():
        torch.testing.assert_close(again[name], value, rtol=0, atol=0, msg=name)
