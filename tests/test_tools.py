"""The tools researchers expect around a run: loggers (TensorBoard beside metrics.csv), the Optuna
search (objective: best validation accuracy), export (ONNX / TorchScript / torch.export)."""

import csv
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import QUIET, REPO, cli

from mnist_lab import Classifier, load_config, model_config, train
from mnist_lab.errors import ConfigError
from mnist_lab.rundir import read_history

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
    history = read_history(run / "metrics.csv", by="epoch")  # the csv logger still writes the history
    assert [e.value for e in events.Scalars("val/acc")] == pytest.approx(history["val/acc"].dropna().tolist())
    assert [e.value for e in events.Scalars("lr-Adam")] == pytest.approx([0.002, 0.002])
    hparams = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info.hparams
    assert (hparams["optimizer/lr"].number_value, hparams["net/name"].string_value) == (0.002, "fc")
    assert events.Scalars("hparams/best_val/acc")[0].value == pytest.approx(metrics["best_val/acc"])


def test_the_csv_logger_cannot_be_dropped(synthetic_root, tmp_path):
    assert list(load_config(["logger=[csv,tensorboard]"]).logger) == ["csv", "tensorboard"]
    with pytest.raises(ConfigError, match=r"logger.csv is needed by every run .* logger=\[csv,tensorboard\]"):
        train(load_config(["logger.csv=null", f"data.root={synthetic_root}", *SHORT]), tmp_path / "run")


def search(args, synthetic_root, tmp_path, env=None) -> subprocess.Popen:
    """``python -m mnist_lab.train -m hparams_search=optuna ARGS``, started (with ``tests/`` on the path)."""
    env = {**os.environ, "MNIST_LAB_DATA": str(synthetic_root), "PYTHONWARNINGS": "ignore", **(env or {}),
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "mnist_lab.train", "-m", "hparams_search=optuna", *args],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# the README's command (its overrides and Optuna's four long floats once made a 270-character job dir name:
# "File name too long"), 3 trials
README_SEARCH = ["hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.n_startup_trials=2", "model=fc",
                 "trainer.max_epochs=2", "++trainer.limit_train_batches=30", "++trainer.limit_val_batches=3",
                 "++trainer.limit_test_batches=3", "++eval.full=false", "trainer.enable_progress_bar=false",
                 "plots=false"]


def test_two_workers_on_one_sqlite_study_search_together_for_the_best_val_accuracy(synthetic_root, tmp_path):
    """Two processes x 3 trials on one SQLite storage, started with the very same command (the sampler is
    seeded per trial: no seed per worker): 6 distinct finished trials; each trial's objective is its best val
    accuracy (never a test metric); the summary names the study's best trial. Job dirs are short whatever
    the overrides."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    optuna = pytest.importorskip("optuna")
    storage = f"sqlite:///{tmp_path / 'search.db'}"
    shared = [*README_SEARCH, f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=shared"]
    workers = [search([*shared, f"hydra.sweep.dir={tmp_path / 'w0'}"], synthetic_root, tmp_path)]
    while workers[0].poll() is None and not (tmp_path / "w0" / "multirun.yaml").is_file():
        time.sleep(0.2)  # the second worker starts once the first has composed its config
    workers.append(search([*shared, f"hydra.sweep.dir={tmp_path / 'w1'}"], synthetic_root, tmp_path))
    for worker in workers:
        assert worker.wait(timeout=600) == 0, worker.communicate()[1][-2000:]

    trials = optuna.load_study(study_name="shared", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 6
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 6  # no trial twice
    rows = [r for w in (0, 1) for r in csv.DictReader(open(tmp_path / f"w{w}" / "summary.csv", newline=""))]
    assert len(rows) == 6 and {r["status"] for r in rows} == {"completed"}
    assert all(1e-4 <= float(r["optimizer.lr"]) <= 1e-2 and r["data.batch_size"] in {"32", "64", "128", "256"}
               for r in rows)
    assert sorted(t.value for t in trials) == pytest.approx(sorted(float(r["best_val/acc"]) for r in rows))
    assert all(len(p.name) <= 52 for w in (0, 1) for p in (tmp_path / f"w{w}").iterdir())
    best = max(trials, key=lambda t: t.value)
    last = max((0, 1), key=lambda w: (tmp_path / f"w{w}" / "summary.md").stat().st_mtime)  # saw all 6
    assert (f"Optuna's best trial (objective: best val acc = {best.value:.4f})"
            in (tmp_path / f"w{last}" / "summary.md").read_text())


def test_a_killed_search_resumes_with_its_finished_trials_and_the_killed_one_goes_on(synthetic_root, tmp_path):
    """SIGTERM in the second trial; ``-m resume=<sweep dir>`` keeps the finished trial, runs the killed one
    again in its own job dir from its last checkpoint, and completes the 3 trials n_trials asks for."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    optuna = pytest.importorskip("optuna")
    sweep = tmp_path / "search"
    kill = [f"+callbacks.kill.{k}={v}" for k, v in (("_target_", "probes.SignalAtJob"), ("epoch", 1), ("batch", 1),
                                                    ("signal", "SIGTERM"))]
    killed = cli("mnist_lab.train", "-m", "hparams_search=optuna", *README_SEARCH, *kill, f"hydra.sweep.dir={sweep}",
                 data_root=synthetic_root, env={"MNIST_LAB_SIGNAL_JOB": "1"})
    assert killed.returncode == 143, killed.stderr[-2000:]
    jobs = {p: json.loads((p / "metrics.json").read_text())["status"] for p in sweep.iterdir() if p.is_dir()}
    assert sorted(jobs.values()) == ["completed", "interrupted"]
    resumed = cli("mnist_lab.train", "-m", f"resume={sweep}", data_root=synthetic_root, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "the search has 1 finished trials of 3" in resumed.stdout
    trials = optuna.load_study(study_name="search", storage=f"sqlite:///{sweep / 'optuna.db'}").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]  # FAIL: killed, redone
    assert trials[2].params == trials[1].params
    interrupted = next(p for p, status in jobs.items() if status == "interrupted")
    assert json.loads((interrupted / "metrics.json").read_text())["status"] == "completed"  # went on in its dir
    with open(sweep / "summary.csv", newline="") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["completed"] * 3


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


def test_export_cli_writes_beside_the_tested_checkpoint_and_refuses_an_unknown_format(fc_run, tmp_path):
    pytest.importorskip("onnxruntime")
    run, metrics = fc_run
    proc = cli("mnist_lab.export", f"run_dir={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    onnx_file = run / "checkpoints" / "last.onnx"  # beside the tested checkpoint (fc_run tests its last)
    assert f"exported: {onnx_file} (onnx" in proc.stdout and onnx_file.stat().st_size > 4 * 101_770
    diff = float(proc.stdout.split("max |logits - PyTorch| = ")[1].split()[0])
    assert diff < 1e-4
    proc = cli("mnist_lab.export", f"run_dir={run}", "format=tflite", cwd=tmp_path)
    assert proc.returncode == 2 and "unknown format='tflite'; choose one of onnx, torchscript, pt2" in proc.stderr


def test_the_trial_seeded_sampler_repeats_a_lone_worker_and_gives_each_trial_its_own_seed():
    """One worker with one seed proposes the same trials in the same order; the proposal of trial n depends
    on seed + n, so workers sharing a storage (trial numbers unique there) do not repeat each other."""
    optuna = pytest.importorskip("optuna")
    from mnist_lab.search import TrialSeededTPE

    def proposals(seed: int, trials: int = 6) -> list[float]:
        study = optuna.create_study(sampler=TrialSeededTPE(seed=seed, n_startup_trials=3))
        study.optimize(lambda t: (t.suggest_float("lr", 1e-4, 1e-2, log=True) - 1e-3) ** 2, n_trials=trials)
        return [t.params["lr"] for t in study.trials]

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    first = proposals(0)
    assert proposals(0) == first and len(set(first)) == 6  # reproducible, and no trial twice
    assert proposals(1)[:2] == first[1:3]  # seed 1's trial 0 is seed 0's trial 1: the seed moves with the trial
