"""Training entry point: ``train(cfg, output_dir)`` and ``resume(run_dir)`` for code,
``python -m mnist_lab.train [overrides | resume=RUN_DIR]`` for the shell.

``train`` builds every object from its ``_target_`` node in the composed config (see
:func:`mnist_lab.config.load_config`): the datamodule (``data``), the LightningModule (``module``,
with the network ``model``, ``optimizer`` and ``scheduler``), the callbacks and the trainer. It
checks the config and the data before training starts, fits, evaluates the tested weights on the
in-memory model and datamodule (:func:`mnist_lab.evaluate.evaluate_model`) and writes the run dir
(:mod:`mnist_lab.rundir`): ``config.yaml``, ``checkpoints/{best,last}.ckpt``, ``metrics.csv``,
``metrics.json`` (with ``status`` ``completed``, or ``failed``/``diverged``/``interrupted``),
``curves.png``, ``confusion_matrix.png``, ``samples.png`` and the evaluation suite's files.
"""

from __future__ import annotations

import csv
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator
from lightning.pytorch.callbacks import ProgressBar, Timer
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from mnist_lab.config import build
from mnist_lab.errors import ConfigError, MnistLabError, RunInterrupted, TrainingDiverged, exit_with
from mnist_lab.evaluate import evaluate_model, robustness_headline
from mnist_lab.models import count_parameters
from mnist_lab.plots import plot_curves, plot_samples, read_epoch_metrics
from mnist_lab.rundir import RunDir, check_writable, read_checkpoint, write_text_atomic

TEST_KEYS = ("test/acc", "test/loss", "test/precision_macro", "test/recall_macro", "test/f1_macro")
#: Callbacks every run needs (``conf/callbacks/default.yaml``): the checkpoints test_ckpt and resume= use, the timer
#: behind train_seconds, and the state an exact resume needs.
#: what main() returns to a sweeper: selection on the validation split, never on the test set
OBJECTIVE = "best_val/acc"
REQUIRED_CALLBACKS = ("best_checkpoint", "last_checkpoint", "timer", "resume_state")


def check_config(cfg: DictConfig) -> None:
    """The run's own settings, checked before anything is built.

    Raises:
        ConfigError: ``seed`` or ``threads`` not an integer, ``test_ckpt`` not best/last, a required
            callback or the csv logger set to null, or ``trainer.accelerator=gpu`` on a machine without a GPU.
    """
    for key, value in (("seed", cfg.seed), ("threads", cfg.get("threads"))):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ConfigError(f"{key}={value!r} must be a non-negative integer, e.g. {key}=42")
    if cfg.get("test_ckpt") not in ("best", "last"):
        raise ConfigError(f"test_ckpt={cfg.get('test_ckpt')!r} must be 'best' or 'last'")
    missing = [name for name in REQUIRED_CALLBACKS if not cfg.callbacks.get(name)]
    if missing:
        raise ConfigError(f"callbacks.{missing[0]} is needed by every run; do not set it to null")
    k = cfg.get("steps_per_execution", 1)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ConfigError(f"steps_per_execution={k!r} must be a positive integer, e.g. steps_per_execution=8")
    if k > 1 and (cfg.trainer.get("accumulate_grad_batches") or 1) > 1:
        raise ConfigError("steps_per_execution > 1 runs one optimizer step per mini-batch; it cannot accumulate "
                          "gradients: use trainer.accumulate_grad_batches with steps_per_execution=1")
    if not (cfg.get("logger") or {}).get("csv"):
        raise ConfigError("logger.csv is needed by every run (metrics.csv is the run's history); keep it and add "
                          "others beside it, e.g. logger=[csv,tensorboard]")
    accelerator = str(cfg.trainer.get("accelerator"))
    if accelerator in ("gpu", "cuda") and not (CUDAAccelerator.is_available() or MPSAccelerator.is_available()):
        raise ConfigError(f"trainer.accelerator={accelerator}, but torch finds no GPU on this machine; use "
                          "trainer.accelerator=cpu, or auto (a GPU when there is one)")


def train(cfg: DictConfig, output_dir: str | Path | None = None, ckpt_path: str | Path | None = None,
          callbacks: Sequence[L.Callback] = ()) -> dict:
    """Train, test and report one run; returns the contents of ``metrics.json``.

    Args:
        cfg: composed config (``conf/train.yaml`` + overrides).
        output_dir: the run dir; ``None`` makes a new one under ``outputs/runs/``. It must not hold
            an earlier run (a new run never overwrites one), unless ``ckpt_path`` continues it.
        ckpt_path: continue this run from a checkpoint of it (what :func:`resume` passes): epoch,
            optimizer, LR scheduler, early stopping, RNG states and ``metrics.csv`` rows up to it.
        callbacks: more Lightning callbacks (objects; the config's ``callbacks`` takes ``_target_`` nodes).

    If training stops early, ``metrics.json`` says why (``status``): ``failed`` (bad input, with the
    error), ``diverged`` (NaN/inf loss) or ``interrupted`` (SIGINT/SIGTERM, with the resume command).
    Under DDP every process runs this; only rank 0 writes the run dir and evaluates (the others
    return ``{"status": "completed"}``).

    Raises:
        ConfigError: bad config values, or a run dir that holds a run or cannot be written, before
            any data is read.
        DataError: missing or corrupt dataset files, before training starts.
        TrainingDiverged: the training loss became NaN/inf.
        RunInterrupted: SIGINT (Ctrl-C) or SIGTERM during the run.
    """
    run = RunDir(output_dir) if output_dir is not None else RunDir.new()
    if ckpt_path is None and cfg.get("run_dir") not in (None, str(run.path)):
        raise ConfigError(f"run_dir={cfg.run_dir} is filled in by mnist_lab.train; choose the run dir with "
                          "hydra.run.dir=... (train(cfg, output_dir) from Python)")
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.run_dir = str(run.path)
    resuming = ckpt_path is not None
    rank0 = rank_zero_only.rank == 0  # DDP: every process runs this; only rank 0 writes the run dir
    if rank0 and resuming:
        check_writable(run.path)
    elif rank0:  # before the try: an earlier run's metrics.json must not get this run's status
        run.check_new()
    try:
        check_config(cfg)
        if rank0 and not resuming:
            write_text_atomic(run.config, OmegaConf.to_yaml(cfg, resolve=True))
        return _fit_and_report(cfg, run, ckpt_path, rank0, list(callbacks))
    except TrainingDiverged as e:
        if rank0:
            last = run.checkpoint("last")
            run.write_status("diverged", e, epoch=e.epoch, step=e.step, lr=e.lr,
                             last_good_checkpoint=os.path.relpath(last, run.path) if last.is_file() else None)
        raise
    except (KeyboardInterrupt, SystemExit) as e:
        # Lightning turns Ctrl-C inside fit into sys.exit(1) and SIGTERM into SIGTERMException
        if isinstance(e, SystemExit) and not isinstance(e, SIGTERMException) and e.code != 1:
            raise
        signal_name = "SIGTERM" if isinstance(e, SIGTERMException) else "SIGINT"
        last = run.checkpoint("last")
        command = f"python -m mnist_lab.train resume={run.path}"
        message = (f"stopped by {signal_name}. The last complete epoch is in {last}; continue with: {command}"
                   if last.is_file() else
                   f"stopped by {signal_name} before the first epoch ended, so there is no checkpoint to "
                   f"resume from; start the run again (its settings: {run.config})")
        if rank0:
            run.write_status("interrupted", message, resume=command if last.is_file() else None)
        raise RunInterrupted(message, signal_name) from None
    except Exception as e:
        if rank0 and not resuming:  # a failed resume leaves the run's earlier status as it was
            run.write_status("failed", e)
        raise


def resume(run_dir: str | Path) -> dict:
    """Continue a killed or interrupted run in its own run dir, from ``checkpoints/last.ckpt``
    (written after every epoch), with the run's own ``config.yaml``; returns ``metrics.json``.

    The epoch count, optimizer, LR scheduler, early stopping, timer and RNG states come from the
    checkpoint, and ``metrics.csv`` keeps its rows up to that epoch, so on CPU with
    ``trainer.deterministic=true`` the resumed run ends with the uninterrupted run's metrics.
    The interrupted epoch is trained again from its start. Do not move the run dir before resuming
    (the checkpoint callbacks only restore their state in the dir they wrote).

    Raises:
        ConfigError: not a run dir, a run that completed or diverged, no or an unreadable checkpoint.
    """
    run = RunDir(run_dir)
    if not run.config.is_file():
        raise ConfigError(f"resume={run.path}: no config.yaml there, so it is not a run dir of mnist_lab.train "
                          "(those look like outputs/runs/<date>_<time>)")
    status = run.read_metrics().get("status")
    if status == "completed":
        raise ConfigError(f"resume={run.path}: that run completed; there is nothing to resume. To train longer, "
                          "start a new run (e.g. with trainer.max_epochs=...)")
    if status == "diverged":
        raise ConfigError(f"resume={run.path}: that run diverged; from its last good checkpoint it would diverge "
                          "again the same way. Start a new run with a lower optimizer.lr")
    ckpt = run.checkpoint("last")
    if not ckpt.is_file():
        raise ConfigError(f"resume={run.path}: there is no checkpoints/last.ckpt (the run stopped before its first "
                          f"epoch ended); start it again as a new run with the settings in {run.config}")
    return train(OmegaConf.load(run.config), run.path, ckpt_path=ckpt)


def _fit_and_report(cfg: DictConfig, run: RunDir, ckpt_path: Path | None, rank0: bool, more_callbacks: list) -> dict:
    if cfg.get("threads"):
        torch.set_num_threads(cfg.threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build(cfg.data, "data", base=L.LightningDataModule)
    module = build(cfg.module, "module", base=L.LightningModule)
    callbacks = {name: build(node, f"callbacks.{name}", base=L.Callback) for name, node in cfg.callbacks.items()
                 if node is not None}
    if not cfg.trainer.enable_progress_bar:  # Lightning refuses a progress-bar callback then
        callbacks = {name: c for name, c in callbacks.items() if not isinstance(c, ProgressBar)}
    loggers = {name: build(node, f"logger.{name}", base=Logger) for name, node in cfg.logger.items()
               if node is not None}
    clip = {}
    if not module.automatic_optimization and cfg.trainer.get("gradient_clip_val"):
        # Lightning clips only in automatic optimisation: the Classifier clips each of its K steps
        module.gradient_clip = (cfg.trainer.gradient_clip_val, cfg.trainer.get("gradient_clip_algorithm") or "norm")
        clip = {"gradient_clip_val": None}
    trainer = build(cfg.trainer, "trainer", base=L.Trainer, callbacks=[*callbacks.values(), *more_callbacks],
                    logger=list(loggers.values()), **clip)
    if rank0:  # downloads happen on rank 0 only (Lightning's contract); the data is read and checked now,
        datamodule.prepare_data()  # before training starts
    datamodule.setup("fit")
    if rank0 and ckpt_path is None and cfg.plots:
        x, y = datamodule.splits["train"]
        plot_samples(x[:25], y[:25], run.path / "samples.png", title="first 25 training digits")
    if rank0 and ckpt_path is not None:
        restore_history(loggers["csv"], run, up_to_epoch=int(read_checkpoint(ckpt_path)["epoch"]))
    with warnings.catch_warnings():
        # CSVLogger warns that the run dir is not empty (we wrote config.yaml); it replaces only
        # metrics.csv. The logging-interval warning is about per-step logs, and we log per epoch.
        warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    timer: Timer = callbacks["timer"]
    train_seconds, epochs = timer.time_elapsed("train"), trainer.current_epoch
    if not rank0:
        return {"status": "completed"}

    tested = callbacks[f"{cfg.test_ckpt}_checkpoint"].best_model_path  # "" if no epoch completed
    if tested:  # the weights of the tested checkpoint, into the in-memory model
        module.load_state_dict(read_checkpoint(tested)["state_dict"])
    module.to(trainer.strategy.root_device)  # fit's teardown left it on the CPU: evaluate where it trained
    result = evaluate_model(module, datamodule, run.path, full=cfg.eval.full, seed=cfg.eval.seed, plots=cfg.plots,
                            temperature=cfg.eval.temperature, max_images=cfg.eval.max_images)
    history = read_epoch_metrics(run.history)
    val_loss = history.get("val/loss", {})
    best_epoch = min(val_loss, key=val_loss.get) if val_loss else None
    last_epoch = max(val_loss) if val_loss else None
    metrics = {
        "status": "completed",
        "model": module.name,
        "architecture": type(module.net).__name__,
        **{k: result[k] for k in TEST_KEYS},
        **{k: result[k] for k in ("test/ece", "test/nll", "temperature", "test/ece_scaled", "test/nll_scaled")
           if k in result},
        **robustness_headline(result.get("robustness", {})),
        "best_epoch": best_epoch,
        **{f"best_{k}": history[k].get(best_epoch) for k in ("val/loss", "val/acc", "val/f1_macro") if k in history},
        **{f"last_{k}": history[k].get(last_epoch) for k in ("train/loss", "train/acc", "val/loss", "val/acc")
           if k in history},
        "params_trainable": count_parameters(module.net),
        "train_seconds": round(train_seconds, 3),
        "seconds_per_epoch": round(train_seconds / max(epochs, 1), 3),
        "epochs": epochs,
        "seed": cfg.seed,
        "dataset": datamodule.hparams.dataset,
        "split": datamodule.hparams.split,
        "split_seed": datamodule.hparams.split_seed,
        **{f"n_{k}": v for k, v in datamodule.split_sizes.items()},
        "aug": datamodule.hparams.augment,
        "batch_size": datamodule.hparams.batch_size,
        "normalize": {"mode": datamodule.hparams.normalize, "mean": datamodule.mean, "std": datamodule.std},
        "test_ckpt": os.path.relpath(tested, run.path) if tested else None,
        "device": str(trainer.strategy.root_device),
        "data_root": str(datamodule.root.resolve()),
        "run_dir": str(run.path),
    }
    run.write_metrics(metrics)
    for logger in loggers.values():  # TensorBoard's HPARAMS tab: the run's settings against its results
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams({**OmegaConf.to_container(cfg.module, resolve=True), "data": datamodule.hparams,
                                    "seed": cfg.seed, "epochs": epochs},
                                   {f"hparams/{k}": metrics[k] for k in ("best_val/acc", "test/acc") if k in metrics})
            logger.finalize("success")  # fit already closed the writer: flush and close the one this reopened
    if cfg.plots:
        plot_curves(run.history, run.path / "curves.png", title=module.name)
    print(f"run dir: {run.path}")
    print(f"test/acc: {metrics['test/acc']:.4f}  ({module.name}, {epochs} epochs, {train_seconds:.1f} s)")
    return metrics


def restore_history(logger: CSVLogger, run: RunDir, up_to_epoch: int) -> None:
    """Keep the rows of ``metrics.csv`` up to ``up_to_epoch`` when a run is resumed.

    Lightning's CSVLogger deletes an existing ``metrics.csv`` when it starts, so the rows are moved
    aside (``.metrics.csv.resume``, kept until they are written again: a resume killed here loses
    nothing) and logged again through the logger, which then appends the resumed epochs. Rows without
    an epoch (the learning rate, logged as each epoch starts) are kept up to the last kept epoch's
    step: the resumed run logs the next epoch's again.
    """
    path, aside = run.history, run.path / ".metrics.csv.resume"
    if path.is_file() and not aside.is_file():
        os.replace(path, aside)
    if not aside.is_file():
        return
    with open(aside, newline="") as f:
        every = list(csv.DictReader(f))
    kept = [r for r in every if r.get("epoch") and int(float(r["epoch"])) <= up_to_epoch]
    last_step = max((int(float(r["step"])) for r in kept), default=-1)
    rows = [r for r in every if r in kept or (not r.get("epoch") and int(float(r["step"])) <= last_step)]
    for row in rows:
        values = {k: int(float(v)) if k == "epoch" else float(v)
                  for k, v in row.items() if k != "step" and v not in ("", None)}
        logger.log_metrics(values, step=int(float(row["step"])))
    logger.save()
    aside.unlink()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """``python -m mnist_lab.train [overrides]``: train one run, or one job of a ``-m`` sweep;
    ``python -m mnist_lab.train resume=RUN_DIR`` continues a killed or interrupted run.

    Returns the run's best validation accuracy (``OBJECTIVE``, what a sweeper such as Optuna
    maximises; never a test metric), or None for a failed job of a sweep.

    A run stopped by bad input prints one line and exits with the error's code (2: config or data,
    3: diverged; 130/143: SIGINT/SIGTERM). In a sweep, a failed job is recorded in its
    ``metrics.json`` and the sweep goes on; the summary lists it. Ctrl-C stops the whole sweep.
    """
    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        if cfg.get("resume"):
            others = [o for o in hc.overrides.task if o.lstrip("+~").split("=")[0] != "resume"]
            if multirun:
                raise ConfigError("resume= continues one run; resume the jobs of a sweep one at a time "
                                  "(python -m mnist_lab.train resume=<job dir>)")
            if others:
                raise ConfigError(f"resume={cfg.resume} continues the run with its own config.yaml; drop the "
                                  f"other overrides ({' '.join(others)}), or start a new run with them")
            return resume(out).get(OBJECTIVE)
        return train(cfg, out).get(OBJECTIVE)
    except RunInterrupted as e:  # also in a sweep: Ctrl-C stops the sweep
        exit_with(e)
    except Exception as e:
        if multirun:
            print(f"job {hc.job.override_dirname or hc.job.num} failed: {type(e).__name__}: {e}", file=sys.stderr)
            return None
        if isinstance(e, MnistLabError):
            exit_with(e)
        raise


if __name__ == "__main__":
    main()
