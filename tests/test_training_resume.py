"""Training set-ups around the engine: resume from a checkpoint, gradient accumulation, AMP, torch.compile."""
import io

import pytest
import torch
import torch.nn.functional as F

import sift_compiler as sift
from test_sparsity_common import assert_exact, batches, compiled, train


def _make(method, module, opt):
    kwargs = dict(total_steps=30, update_interval=5, seed=7)
    return {"set": sift.sparsity.SET, "rigl": sift.sparsity.RigL}[method](module, opt, **kwargs)


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_resume_from_state_dicts_gives_identical_masks_and_weights(method):
    """Stop after step 14 (the next step updates, so dense-gradient mode must be restored too),
    save model, optimizer and engine through torch.save(weights_only load), continue in fresh objects."""
    data = batches(30)
    module = compiled()
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    engine = _make(method, module, opt)
    train(module, opt, engine, data)

    first = compiled()
    opt1 = torch.optim.SGD(first.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    engine1 = _make(method, first, opt1)
    train(first, opt1, engine1, data[:14])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict(), "masks": engine1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    second = compiled(seed=1)     # different initial weights and masks: everything must come from the file
    opt2 = torch.optim.SGD(second.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    engine2 = _make(method, second, opt2)
    second.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    engine2.load_state_dict(saved["masks"])
    assert engine2.step_count == 14 and all(w.layer.dense_grad == (method == "rigl") for w in engine2.weights)
    train(second, opt2, engine2, data[14:])

    assert [h["step"] for h in engine2.history] == [h["step"] for h in engine.history] == [5, 10, 15, 20]
    for name, mask in engine.masks().items():
        assert torch.equal(mask, engine2.masks()[name]), name
    for (name, a), b in zip(module.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name


def test_gradient_accumulation_grows_from_the_accumulated_dense_gradient():
    """Two half batches per optimizer step (loss / 2 each) pick the same masks as one full batch (float64)."""
    data = batches(12, size=16, dtype=torch.float64)
    results = []
    for micro in (1, 2):
        module = compiled(dtype=torch.float64)
        opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
        engine = sift.sparsity.RigL(module, opt, total_steps=12, update_interval=3)
        module.eval()  # BatchNorm statistics of half batches differ; eval makes the two runs the same function
        for x, y in data:
            for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
                (F.cross_entropy(module(xs), ys) / micro).backward()
            opt.step()
            engine.step()
            opt.zero_grad()
            assert_exact(module, engine)
        assert len(engine.history) == 2 and engine.history[0]["grown"] > 0
        results.append({k: v.clone() for k, v in engine.masks().items()})
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_amp_with_grad_scaler_keeps_masks_exact_and_postpones_updates_on_skipped_steps():
    """bfloat16 autocast on CPU with a GradScaler. Steps 1 and 2 overflow (loss x 1e38), so the
    scaler skips optimizer.step(); the update due at step 2 waits for step 3, the next (step 4)
    runs on time, and weights, gradients and state stay exact and finite throughout."""
    module = compiled()
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    engine = sift.sparsity.RigL(module, opt, total_steps=12, update_interval=2, end_fraction=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    updated, scales = [], []
    for i, (x, y) in enumerate(batches(8)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(module(x), y) * (1e38 if i < 2 else 1.0)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        if engine.step():
            updated.append(i + 1)
        opt.zero_grad()
        assert_exact(module, engine)
        assert all(torch.isfinite(w.param).all() for w in engine.weights)
    assert scales[:3] == [512.0, 256.0, 256.0]          # two skipped steps, then normal ones
    assert updated == [3, 4]


def test_torch_compiled_model_gets_dense_gradients_and_stays_exact():
    """torch.compile (aot_eager: dynamo's tracing and guards without inductor's C++ build time)."""
    module = compiled()
    model = torch.compile(module, backend="aot_eager")
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    engine = sift.sparsity.RigL(model, opt, total_steps=8, update_interval=3)
    assert engine.module is module
    dense_seen = []
    for i, (x, y) in enumerate(batches(6)):
        F.cross_entropy(model(x), y).backward()
        w = engine.weights[0]
        dense_seen.append(bool(w.param.grad[~w.layer.weight_mask].any()))
        opt.step()
        engine.step()
        opt.zero_grad()
        assert_exact(module, engine)
    assert dense_seen == [False, False, True, False, False, False]   # dense gradient only on the update step
    assert len(engine.history) == 1 and engine.history[0]["grown"] > 0
