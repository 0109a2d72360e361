"""The training entry point: the CLI command as written, library use, config/data errors, real data."""

import csv
import json
import subprocess

import lightning as L
import matplotlib.image
import pytest
import torch
from conftest import QUIET, REPO, cli

import mnist_lab
from mnist_lab import Classifier, MNISTDataModule, build_model, load_config, model_config, train
from mnist_lab.errors import ConfigError


def test_cli_command_trains_writes_every_output_and_prints_lightnings_useful_lines(synthetic_root, tmp_path):
    """The README's command, as written (the model summary on, the progress bar off for the log)."""
    run = tmp_path / "run"
    proc = cli("mnist_lab.train", "model=conv2", "+aug=true", f"hydra.run.dir={run}", "trainer.max_epochs=3",
               "trainer.enable_progress_bar=false", data_root=synthetic_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    lines = proc.stdout.strip().splitlines()
    assert lines[-2] == f"run dir: {run}"
    assert lines[-1].startswith(f"test/acc: {metrics['test/acc']:.4f}")
    printed = proc.stdout + proc.stderr
    assert "GPU available:" in printed and "`Trainer.fit` stopped" in printed  # Lightning's useful lines
    for noise in ("TPU available", "litlogger", "litmodels", "LeafSpec", "smaller than the logging interval",
                  "exists and is not empty"):
        assert noise not in printed, noise

    for key in ("test/acc", "test/loss", "test/precision_macro", "test/recall_macro", "test/f1_macro"):
        assert 0 <= metrics[key] <= 1.0001 or key == "test/loss"
    assert metrics["test/acc"] > 0.5  # 10 classes: chance is 0.1
    assert metrics["params_trainable"] == 225_034 and metrics["model"] == "conv2"
    assert (metrics["n_train"], metrics["n_val"], metrics["n_test"]) == (800, 100, 100)
    assert metrics["seed"] == 42 and metrics["aug"] is True and metrics["status"] == "completed"
    assert 1 <= metrics["epochs"] <= 3 and metrics["train_seconds"] > 0
    # conv2's forward FLOPs per image, by hand (a multiply-add is 2): conv 26*26*32*9*2 + conv 11*11*64*288*2
    # + dense 1600*128*2 + dense 128*10*2
    flops = 26 * 26 * 32 * 9 * 2 + 11 * 11 * 64 * 288 * 2 + 1600 * 128 * 2 + 128 * 10 * 2
    assert flops == 5_262_080 and "Total FLOPs: 5.3 M" in printed and metrics["flops_per_image"] == flops
    assert metrics["mnist_lab_version"] == mnist_lab.__version__ and metrics["torch_version"] == torch.__version__
    assert metrics["lightning_version"] == L.__version__ and metrics["device_name"]
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert metrics["git_commit"] == (head.stdout.strip() if (REPO / ".git").exists() else None)
    assert isinstance(metrics["git_dirty"], bool) or metrics["git_commit"] is None

    config = (run / "config.yaml").read_text()
    assert "augment: true" in config and "name: conv2" in config
    assert (run / ".hydra" / "overrides.yaml").is_file()
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    epochs_with_val = {r["epoch"] for r in rows if r.get("val/loss")}
    epochs_with_train = {r["epoch"] for r in rows if r.get("train/loss")}
    assert len(epochs_with_val) == len(epochs_with_train) == metrics["epochs"]
    for png in ("curves.png", "confusion_matrix.png", "samples.png"):
        image = matplotlib.image.imread(run / png)
        assert image.shape[0] > 200 and image.std() > 0.01  # a real picture, not a blank canvas

    ckpt = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True, map_location="cpu")
    assert float(ckpt["state_dict"]["mean"]) == pytest.approx(metrics["normalize"]["mean"])
    assert ckpt["hyper_parameters"]["net"]["name"] == "conv2"
    assert ckpt["hyper_parameters"]["net"]["num_classes"] == ckpt["datamodule_hyper_parameters"]["num_classes"] == 10
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert last["epoch"] == metrics["epochs"] - 1  # the last epoch, whether or not it was the best


def test_aug_flag_is_appended_with_plus_and_reaches_the_datamodule():
    assert load_config([]).data.augment is False
    assert load_config(["+aug=true"]).data.augment is True
    assert load_config(["+aug=false"]).data.augment is False


def test_train_from_python_without_hydra_run(synthetic_root, tmp_path):
    cfg = load_config(["model=fc", f"data.root={synthetic_root}", "trainer.max_epochs=2", "plots=false", *QUIET])
    metrics = train(cfg, tmp_path / "run")
    assert metrics["test/acc"] > 0.5 and metrics["params_trainable"] == 101_770
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == metrics


def test_notebook_style_use_of_the_pieces(synthetic_root, tmp_path):
    L.seed_everything(0)
    dm = MNISTDataModule(root=synthetic_root, batch_size=64, augment=True)
    model = Classifier(model_config("conv3"))
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, dm)
    result = trainer.test(model, dm, verbose=False)[0]
    assert result["test/acc"] > 0.5
    trainer.save_checkpoint(tmp_path / "nb.ckpt")  # a notebook's checkpoint describes its model too
    loaded = Classifier.load_from_checkpoint(tmp_path / "nb.ckpt", weights_only=True)
    x = dm.splits["test"][0].float().unsqueeze(1) / 255
    assert torch.equal(loaded.eval()(x), model.eval()(x))
    assert Classifier(build_model("conv3")).net.num_features == loaded.net.num_features == 576


def test_load_from_checkpoint_alone_reproduces_the_runs_test_accuracy(fc_run, synthetic_root):
    """Lightning's own API, the checkpoint alone (no datamodule, no config): images in [0, 1] -> logits."""
    run, metrics = fc_run
    assert 0.15 < metrics["test/acc"] < 0.95  # undertrained: a wrong model would not match by chance
    model = Classifier.load_from_checkpoint(run / metrics["test_ckpt"]).eval()
    dm = MNISTDataModule(root=synthetic_root)
    dm.setup()
    images, labels = dm.splits["test"]
    with torch.no_grad():
        acc = (model(images.float().unsqueeze(1) / 255).argmax(1) == labels).float().mean().item()
    assert acc == pytest.approx(metrics["test/acc"], abs=1e-4)


def test_bad_config_values_fail_before_training(synthetic_root, tmp_path):
    cfg = load_config(["model.dropout=1.5", f"data.root={synthetic_root}"])
    with pytest.raises(ConfigError, match=r"model.dropout=1.5 is outside \[0, 1\)"):
        train(cfg, tmp_path / "run")
    cfg = load_config(["data.fractions=[0.7,0.2,0.2]", f"data.root={synthetic_root}"])
    with pytest.raises(ConfigError, match="sum to 1"):
        train(cfg, tmp_path / "run2")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_short_run_on_real_mnist_learns(real_root, tmp_path):
    cfg = load_config(["model=conv2", f"data.root={real_root}", "trainer.max_epochs=1", "plots=false",
                       "trainer.limit_train_batches=300", "trainer.limit_val_batches=2", "eval.max_images=1000",
                       *QUIET])
    metrics = train(cfg, tmp_path / "run")  # 9,600 training images, 2,000 val images, 1,000 test images
    assert metrics["test/acc"] > 0.93 and metrics["best_val/loss"] < 0.25
    assert metrics["robustness/rotation_20"] < metrics["test/acc"]  # the suite ran on real digits
    # the checkpoint alone reproduces the run's test accuracy on the same 1,000 real test images
    model = Classifier.load_from_checkpoint(tmp_path / "run" / "checkpoints" / "best.ckpt").eval()
    dm = MNISTDataModule(root=real_root)
    dm.setup()
    images, labels = dm.splits["test"][0][:1000], dm.splits["test"][1][:1000]
    with torch.no_grad():
        acc = (model(images.float().unsqueeze(1) / 255).argmax(1) == labels).float().mean().item()
    assert acc == pytest.approx(metrics["test/acc"], abs=1e-4)


@pytest.mark.slow
def test_published_protocol_conv2_with_augmentation_reaches_99_percent(real_root, tmp_path):
    cfg = load_config(["model=conv2", "+aug=true", f"data.root={real_root}", *QUIET])
    assert train(cfg, tmp_path / "run")["test/acc"] >= 0.99


@pytest.mark.slow
def test_published_protocol_fc_on_the_official_split_reaches_97_percent(real_root, tmp_path):
    cfg = load_config(["model=fc", "data.split=official", f"data.root={real_root}", *QUIET])
    assert train(cfg, tmp_path / "run")["test/acc"] >= 0.97


def test_per_step_loss_is_logged_every_n_steps_only_when_asked(synthetic_root, tmp_path):
    common = ["model=fc", f"data.root={synthetic_root}", "trainer.max_epochs=2", "plots=false", "eval.full=false",
              *QUIET]  # 800 images at batch 32: 25 steps an epoch
    train(load_config([*common, "module.log_train_steps=true", "trainer.log_every_n_steps=5"]), tmp_path / "steps")
    with open(tmp_path / "steps" / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss_step")]
    assert steps == list(range(4, 50, 5))
    train(load_config(common), tmp_path / "epochs")
    with open(tmp_path / "epochs" / "metrics.csv") as f:
        assert "train/loss_step" not in next(csv.reader(f))  # per epoch only by default


def test_zero_epochs_tests_the_untrained_network(synthetic_root, tmp_path):
    """trainer.max_epochs=0 is a baseline, not a traceback: nothing is trained (no checkpoint, no
    curves) and the test reads the initial weights."""
    cfg = load_config(["model=fc", f"data.root={synthetic_root}", "trainer.max_epochs=0", "eval.full=false",
                       *QUIET])
    metrics = train(cfg, tmp_path / "run")
    assert (metrics["status"], metrics["epochs"], metrics["best_epoch"], metrics["test_ckpt"]) == (
        "completed", 0, None, None)
    assert 0 < metrics["test/acc"] < 0.4  # chance is 0.1: the untrained net
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "curves.png").exists()
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == metrics


def test_the_best_epoch_is_the_best_checkpoints_by_its_monitor(synthetic_root, tmp_path):
    """metrics.json's ``best_epoch`` and ``best_val/*`` are the epoch that the best checkpoint kept, by its
    monitor and mode (``+experiment=public_997`` keeps the highest val/acc), not the lowest val/loss."""
    cfg = load_config(["model=fc", f"data.root={synthetic_root}", "trainer.max_epochs=6", "plots=false",
                       "eval.full=false", "callbacks.best_checkpoint.monitor=val/acc",
                       "callbacks.best_checkpoint.mode=max", "callbacks.early_stopping=null", *QUIET])
    metrics = train(cfg, tmp_path / "run")
    with open(tmp_path / "run" / "metrics.csv") as f:
        val = [(int(r["epoch"]), float(r["val/acc"]), float(r["val/loss"])) for r in csv.DictReader(f) if r["val/acc"]]
    most_accurate = max(val, key=lambda row: row[1])  # the first of equals, as ModelCheckpoint keeps it
    assert min(val, key=lambda row: row[2])[0] != most_accurate[0]  # the case this test is about
    kept = torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt", weights_only=True)["epoch"]
    assert (metrics["best_epoch"], metrics["best_val/acc"]) == (most_accurate[0], pytest.approx(most_accurate[1]))
    assert kept == most_accurate[0]
