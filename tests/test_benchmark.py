"""Speed tooling: the benchmark script runs end to end, and the fast path computes the plain loop's math."""

import json
import runpy
import sys
from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO

from mnist_lab import Classifier, MNISTDataModule, build_model
from mnist_lab.transforms import to_unit


def test_benchmark_script_runs_and_writes_every_field(synthetic_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "benchmark.json"
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--models", "fc", "conv2", "--batch-sizes", "16", "--epochs", "2",
                                      "--repeats", "2", "--train-images", "160", "--data-root", str(synthetic_root),
                                      "--out", str(out)])
    assert runpy.run_path(str(REPO / "scripts" / "benchmark.py"))["main"]() == 0  # the script's main, in this process
    result = json.loads(out.read_text())
    assert {"device", "torch", "lightning", "threads", "precision", "epochs", "repeats", "rows"} <= set(result)
    # the package's default steps_per_execution (auto): 2048 images a step at batch 16 is 128, at most 32
    assert [(r["model"], r["batch_size"], r["steps_per_execution"], r["k"]) for r in result["rows"]] == \
        [("fc", 16, "auto", 32), ("conv2", 16, "auto", 32)]
    for row in result["rows"]:
        assert row["images_per_epoch"] == 160
        assert [len(r) for r in row["plain_epoch_seconds"]] == [len(r) for r in row["fit_epoch_seconds"]] == [2, 2]
        assert row["ratio"] == pytest.approx(row["fit_images_per_s"] / row["plain_images_per_s"], abs=1e-3)
        assert row["plain_first_step_loss"] == pytest.approx(2.3, abs=0.5)  # ln(10) at initialisation
    assert "ratio" in capsys.readouterr().out


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
    module.mean.fill_(dm.mean)  # what fitting on dm sets
    module.std.fill_(dm.std)
    with torch.no_grad():
        fast, _, _ = module.model_step(batch)
        plain = F.cross_entropy(module.net(plain_x.unsqueeze(1)[idx]), y[idx])
    assert torch.equal(batch[1], y[idx])
    assert float(fast) == pytest.approx(float(plain), abs=1e-6)
    assert torch.allclose(batch[0], to_unit(x[idx]))


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
        logits = model.eval()(to_unit(x))
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(float(F.cross_entropy(logits, y)), abs=1e-5)
    assert float(trainer.callback_metrics["train/acc"]) == pytest.approx(float((logits.argmax(1) == y).float().mean()))


def fit_a_few_steps(synthetic_root, classifier, precision="32-true", epochs=3, **trainer_kwargs):
    torch.manual_seed(0)
    dm = MNISTDataModule(root=synthetic_root, batch_size=64)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", precision=precision, logger=False,
                        enable_checkpointing=False, limit_val_batches=0, enable_progress_bar=False,
                        enable_model_summary=False, **trainer_kwargs)
    dm.setup()
    x, y = dm.splits["train"]
    xb, yb = to_unit(x[:256]), y[:256]
    with torch.no_grad():
        before = float(F.cross_entropy(classifier.eval()(xb), yb))
    trainer.fit(classifier.train(), dm)
    with torch.no_grad():
        after = float(F.cross_entropy(classifier.eval()(xb), yb))
    return before, after, trainer


@pytest.mark.parametrize(("switch", "precision"), [
    ({"channels_last": True}, "32-true"),
    ({}, "bf16-mixed"),
    ({"compile": True}, "32-true"),
])
def test_speed_switches_keep_conv2s_parameters_and_still_learn(synthetic_root, switch, precision):
    classifier = Classifier(build_model("conv2"), **switch)
    assert sum(p.numel() for p in classifier.parameters() if p.requires_grad) == 225_034
    assert list(classifier.state_dict()) == list(Classifier(build_model("conv2")).state_dict())  # loadable
    if "compile" in switch:  # inductor compiles fc's two layers in about half the time of conv2's
        classifier = Classifier(build_model("fc"), **switch)
    before, after, _ = fit_a_few_steps(synthetic_root, classifier, precision=precision)
    assert after < 0.5 * before


def test_onecycle_is_sized_to_the_run(synthetic_root):
    scheduler = {"scheduler": partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.01), "interval": "step"}
    classifier = Classifier(build_model("fc"), scheduler=scheduler)
    before, after, trainer = fit_a_few_steps(synthetic_root, classifier, epochs=2)
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.total_steps == trainer.estimated_stepping_batches == 2 * 13  # 800 images / 64 per batch
    assert sched.last_epoch == sched.total_steps  # stepped once per batch, to the end of the cycle
    assert after < before


def test_speedrun_recipe_runs_through_the_normal_entry_point(synthetic_root, tmp_path):
    from mnist_lab import load_config, train

    cfg = load_config(["+experiment=speedrun", f"data.root={synthetic_root}", "trainer.enable_progress_bar=false"])
    assert (cfg.data.batch_size, cfg.trainer.max_epochs, cfg.trainer.precision) == (256, 2, "bf16-mixed")
    assert cfg.scheduler.scheduler._target_.endswith("OneCycleLR") and cfg.module.channels_last
    cfg.data.batch_size = 32  # 800 synthetic images: 25 steps (OneCycle needs more than 4)
    metrics = train(cfg, tmp_path / "run")
    assert metrics["params_trainable"] == 225_034 and metrics["epochs"] == 2 and metrics["n_test"] == 100
