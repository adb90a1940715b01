"""examples/train_image_classifier.py end to end on a tiny CIFAR-format directory written here."""
import importlib.util
import json
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("train_image_classifier",
                                               os.path.join(ROOT, "examples", "train_image_classifier.py"))
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)


class SmallRGB(nn.Module):
    """3-channel version of the tests' tiny CNN."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        return self.fc(F.relu(self.bn1(self.conv1(x))).mean((2, 3)))


def _write_cifar10(root):
    rng = np.random.default_rng(0)
    for name, count in (("data_batch_1", 64), ("test_batch", 32)):
        batch = {b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, count).tolist()}
        with open(os.path.join(root, name), "wb") as f:
            pickle.dump(batch, f)


def test_example_trains_checkpoints_resumes_and_summarises(tmp_path, capsys):
    data = tmp_path / "cifar-10-batches-py"
    data.mkdir()
    _write_cifar10(str(data))
    out = tmp_path / "run"
    common = ["--data", str(tmp_path), "--model", "test_training_example:SmallRGB", "--transform", "parallel",
              "--sparsity", "0.75", "--method", "rigl", "--update-interval", "2", "--batch-size", "16",
              "--workers", "0", "--out", str(out), "--quiet", "--lr-schedule", "cosine", "--label-smoothing", "0.1"]
    assert example.main(common + ["--epochs", "2"]) == 0
    straight = json.loads((out / "summary.json").read_text())
    straight_state = torch.load(out / "last.pt", weights_only=True)
    assert straight["mask_updates"] == 2 and abs(straight["flop_ratio"] - 1) < 0.01   # steps 2 and 4 of 8

    assert example.main(common + ["--epochs", "2", "--stop-after-epochs", "1"]) == 0
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1
    assert example.main(common + ["--epochs", "2", "--resume", str(out / "last.pt")]) == 0
    resumed = json.loads((out / "summary.json").read_text())
    resumed_state = torch.load(out / "last.pt", weights_only=True)
    assert resumed["test_accuracy"] == straight["test_accuracy"] and resumed["mask_updates"] == 2
    for name, value in straight_state["model"].items():
        assert torch.equal(value, resumed_state["model"][name]), name
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and "weight MFLOPs / sample" in printed


def test_example_rejects_a_directory_without_data(tmp_path, capsys):
    assert example.main(["--data", str(tmp_path), "--quiet", "--out", str(tmp_path / "o")]) == 2
    assert "neither a CIFAR-format directory" in capsys.readouterr().err


def test_causal_lm_example_trains_dense_and_sparse_with_the_trainer(tmp_path, capsys):
    """examples/train_causal_lm.py at toy size: both models train, report, and save loadable directories."""
    spec = importlib.util.spec_from_file_location("train_causal_lm", os.path.join(ROOT, "examples", "train_causal_lm.py"))
    lm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lm)
    assert lm.main(["--steps", "4", "--hidden", "32", "--layers", "1", "--heads", "2", "--length", "32",
                    "--batch", "4", "--corpus-bytes", "200000", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "sparse model: LlamaForCausalLM (native), hidden 64" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith(("dense ", "wide-rigl "))}
    assert set(rows) == {"dense", "wide-rigl"} and all(float(r[0]) > 1 for r in rows.values())
    assert float(rows["wide-rigl"][1]) == pytest.approx(float(rows["dense"][1]), rel=0.005)  # iso-FLOP per token
    import sift_compiler as sift
    loaded = sift.load(str(tmp_path / "wide-rigl"))
    assert loaded.output == "native" and abs(loaded.report.flop_ratio - 1) < 0.005
