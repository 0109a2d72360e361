"""Speed tooling: the benchmark script runs end to end, and the fast path computes the plain loop's math."""

import json
import os
import subprocess
import sys
from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from mnist_lab import Classifier, MNISTDataModule, build_model
from mnist_lab.transforms import EvalPreset

REPO_SCRIPTS = os.path.join(os.path.dirname(__file__), "..", "scripts")


def test_benchmark_script_runs_and_writes_every_field(synthetic_root, tmp_path):
    out = tmp_path / "benchmark.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO_SCRIPTS, "benchmark.py"), "--models", "fc", "conv2",
                           "--batch-sizes", "16", "--epochs", "2", "--repeats", "2", "--train-images", "160",
                           "--data-root", str(synthetic_root), "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert {"device", "torch", "lightning", "threads", "precision", "epochs", "repeats", "rows"} <= set(result)
    assert [(r["model"], r["batch_size"]) for r in result["rows"]] == [("fc", 16), ("conv2", 16)]
    for row in result["rows"]:
        assert row["images_per_epoch"] == 160
        assert [len(r) for r in row["plain_epoch_seconds"]] == [len(r) for r in row["fit_epoch_seconds"]] == [2, 2]
        assert row["ratio"] == pytest.approx(row["fit_images_per_s"] / row["plain_images_per_s"], abs=1e-3)
        assert row["plain_first_step_loss"] == pytest.approx(2.3, abs=0.5)  # ln(10) at initialisation
    assert "ratio" in proc.stdout


def test_fast_path_gives_the_plain_loops_loss_on_the_same_batch(synthetic_root):
    torch.manual_seed(0)
    dm = MNISTDataModule(root=synthetic_root, batch_size=64)
    dm.setup()
    module = Classifier(build_model("conv2"))
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(3)
    idx = next(iter(loader.sampler))
    batch = next(iter(loader))
    x, y = dm.splits["train"]
    plain_x = (x.float() / 255 - dm.mean) / dm.std  # the floor's normalisation of the whole split
    with torch.no_grad():
        fast, _, _ = module.model_step(batch)
        plain = F.cross_entropy(module.net(plain_x.unsqueeze(1)[idx]), y[idx])
    assert torch.equal(batch[1], y[idx])
    assert float(fast) == pytest.approx(float(plain), abs=1e-6)
    assert torch.allclose(batch[0], EvalPreset(dm.mean, dm.std)(x[idx]))


def test_train_metrics_are_image_means_over_the_epoch(synthetic_root):
    """With lr 0 the weights never change, so the logged epoch train/loss must equal the loss of the
    whole (unequally batched) split, and train/acc its accuracy."""
    torch.manual_seed(0)
    dm = MNISTDataModule(root=synthetic_root, batch_size=96)  # 800 images: 8 x 96 + 32
    model = Classifier(build_model("fc"), optimizer=partial(torch.optim.SGD, lr=0.0))
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, dm)
    x, y = dm.splits["train"]
    with torch.no_grad():
        logits = model.net.eval()(EvalPreset(dm.mean, dm.std)(x))
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(float(F.cross_entropy(logits, y)), abs=1e-5)
    assert float(trainer.callback_metrics["train/acc"]) == pytest.approx(float((logits.argmax(1) == y).float().mean()))
