"""The tools researchers expect around a run: loggers (TensorBoard beside metrics.csv), the Optuna
search (objective: best validation accuracy), export (ONNX / TorchScript / torch.export)."""

import csv

import pytest
import torch
from conftest import QUIET, run_module

from mnist_lab import Classifier, load_config, model_config, train
from mnist_lab.errors import ConfigError
from mnist_lab.rundir import read_epoch_metrics

SHORT = ["model=fc", "trainer.max_epochs=2", "trainer.limit_train_batches=4", "eval.full=false", "plots=false",
         *QUIET]


def test_tensorboard_logger_writes_the_curves_learning_rate_and_hyperparameters_beside_metrics_csv(
        synthetic_root, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run = tmp_path / "run"
    metrics = train(load_config(["logger=tensorboard", "optimizer.lr=0.002", f"data.root={synthetic_root}", *SHORT]),
                    run)
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    history = read_epoch_metrics(run / "metrics.csv")  # the csv logger still writes the history
    assert [e.value for e in events.Scalars("val/acc")] == pytest.approx([history["val/acc"][0],
                                                                         history["val/acc"][1]])
    assert [e.value for e in events.Scalars("lr-Adam")] == pytest.approx([0.002, 0.002])
    hparams = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info.hparams
    assert (hparams["optimizer/lr"].number_value, hparams["net/name"].string_value) == (0.002, "fc")
    assert events.Scalars("hparams/best_val/acc")[0].value == pytest.approx(metrics["best_val/acc"])


def test_the_csv_logger_cannot_be_dropped(synthetic_root, tmp_path):
    assert list(load_config(["logger=[csv,tensorboard]"]).logger) == ["csv", "tensorboard"]
    with pytest.raises(ConfigError, match=r"logger.csv is needed by every run .* logger=\[csv,tensorboard\]"):
        train(load_config(["logger.csv=null", f"data.root={synthetic_root}", *SHORT]), tmp_path / "run")


def test_optuna_search_maximises_best_val_accuracy_and_the_summary_names_the_best_trial(synthetic_root, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "search"
    proc = run_module("mnist_lab.train", ["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=3",
                                          "hydra.sweeper.sampler.n_startup_trials=2", "trainer.max_epochs=1",
                                          "trainer.limit_train_batches=3", *SHORT[3:],
                                          f"hydra.sweep.dir={sweep}"], synthetic_root, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(sweep / "summary.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f)]
    assert len(rows) == 3 and {r["status"] for r in rows} == {"completed"}
    assert len({r["optimizer.lr"] for r in rows}) == 3  # three different trials, lr from the search space
    assert all(1e-4 <= float(r["optimizer.lr"]) <= 1e-2 and r["data.batch_size"] in {"32", "64", "128", "256"}
               for r in rows)
    from omegaconf import OmegaConf
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    # the objective each trial returned is its best val accuracy (not test/acc)
    assert best.best_value == pytest.approx(max(float(r["best_val/acc"]) for r in rows))
    summary = (sweep / "summary.md").read_text()
    assert f"Optuna's best trial (objective: best val acc = {best.best_value:.4f})" in summary


def trained_like(preset: str) -> Classifier:
    """A classifier with non-trivial normalisation and BatchNorm statistics (no training needed for an
    equivalence test: random weights exercise every operator the same way)."""
    torch.manual_seed(0)
    model = Classifier(model_config(preset)).eval()
    model.mean.fill_(0.1307)
    model.std.fill_(0.3081)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize(("preset", "fmt"), [("resnet_20k", "onnx"), ("vit_70k", "onnx"),
                                             ("resnet_20k", "torchscript"), ("conv2_bn", "pt2")])
def test_exported_model_gives_the_pytorch_logits_for_any_batch_size(preset, fmt, tmp_path):
    if fmt == "onnx":
        for package in ("onnx", "onnxscript", "onnxruntime"):
            pytest.importorskip(package)
    from mnist_lab.export import FORMATS, export_model, run_exported

    model = trained_like(preset)
    path = export_model(model, tmp_path / f"model{FORMATS[fmt]}", fmt)
    for batch in (1, 37):  # exported with a batch of 2: the batch dimension stays dynamic
        images = torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = model(images)
        assert (run_exported(path, images) - expected).abs().max().item() < 1e-4


def test_export_cli_writes_beside_the_tested_checkpoint_and_refuses_an_unknown_format(synthetic_root, tmp_path):
    pytest.importorskip("onnxruntime")
    run = tmp_path / "run"
    train(load_config([f"data.root={synthetic_root}", *SHORT]), run)
    proc = run_module("mnist_lab.export", [f"run_dir={run}"], synthetic_root, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    onnx_file = run / "checkpoints" / "best.onnx"
    assert f"exported: {onnx_file} (onnx" in proc.stdout and onnx_file.stat().st_size > 4 * 101_770
    diff = float(proc.stdout.split("max |logits - PyTorch| = ")[1].split()[0])
    assert diff < 1e-4
    proc = run_module("mnist_lab.export", [f"run_dir={run}", "format=tflite"], synthetic_root, tmp_path)
    assert proc.returncode == 2 and "format='tflite' is not one of onnx, torchscript, pt2" in proc.stderr
