"""Training entry point: ``train(cfg, output_dir)`` and ``resume(run_dir)`` for code,
``python -m mnist_lab.train [overrides | resume=RUN_DIR]`` for the shell.

``train`` builds everything from a composed config (see :func:`mnist_lab.config.load_config`),
checks the config and the data before training starts, fits, tests the best checkpoint and
writes the run dir:

- ``config.yaml``: the resolved config (Hydra's ``.hydra/`` folder is there too on the CLI);
- ``checkpoints/best.ckpt`` (lowest ``val/loss``) and ``checkpoints/last.ckpt`` (after every epoch;
  Lightning writes both atomically: temp file + rename);
- ``metrics.csv``: per-epoch metrics (Lightning's CSVLogger);
- ``metrics.json``: the run's summary (test metrics, parameter count, timing, splits, seed, ...),
  written atomically, with ``status`` ``completed`` (or ``failed``/``diverged``/``interrupted``);
- ``curves.png``, ``confusion_matrix.png``, ``samples.png``.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
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
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, Timer, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from mnist_lab.callbacks import DivergenceGuard, ResumeState, check_new_run_dir, check_writable
from mnist_lab.config import instantiate_checked
from mnist_lab.errors import ConfigError, MnistLabError, RunInterrupted, TrainingDiverged, exit_with
from mnist_lab.files import write_json, write_text_atomic
from mnist_lab.models import count_parameters
from mnist_lab.module import Classifier
from mnist_lab.plots import plot_confusion_matrix, plot_curves, plot_samples, read_epoch_metrics

TEST_KEYS = ("test/acc", "test/loss", "test/precision_macro", "test/recall_macro", "test/f1_macro")


def new_run_dir(base: str | Path = "outputs/runs") -> Path:
    """A fresh, timestamped run dir (to the microsecond, so two runs never share one)."""
    return Path(base) / dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")


def build(cfg: DictConfig):
    """Instantiate ``(datamodule, module)`` from a config. All config errors are raised here.

    Raises:
        ConfigError: any bad value (dropout, fractions, batch size, depth, dataset, ...).
    """
    datamodule = instantiate_checked(cfg.data, _convert_="all")
    net = instantiate_checked(cfg.model, _convert_="all")
    optimizer = instantiate_checked(cfg.optimizer)
    sched_cfg = cfg.get("scheduler")
    module = Classifier(
        net,
        optimizer=optimizer,
        scheduler=instantiate_checked(sched_cfg.scheduler) if sched_cfg else None,
        scheduler_interval=sched_cfg.interval if sched_cfg else "epoch",
        scheduler_monitor=sched_cfg.monitor if sched_cfg else "val/loss",
        num_classes=datamodule.num_classes,
        log_train_steps=bool(cfg.get("log_train_steps", False)),
        **cfg.get("speed", {}),
    )
    return datamodule, module


def train(cfg: DictConfig, output_dir: str | Path | None = None, ckpt_path: str | Path | None = None,
          callbacks: Sequence[L.Callback] = ()) -> dict:
    """Train, test and report one run; returns the contents of ``metrics.json``.

    Args:
        cfg: composed config (``conf/train.yaml`` + overrides).
        output_dir: the run dir; ``None`` makes a new one under ``outputs/runs/``. It must not hold
            an earlier run (a new run never overwrites one), unless ``ckpt_path`` continues it.
        ckpt_path: continue this run from a checkpoint of it (what :func:`resume` passes): epoch,
            optimizer, LR scheduler, early stopping, RNG states and ``metrics.csv`` rows up to it.
        callbacks: more Lightning callbacks (objects; the config's ``callbacks.extra`` takes configs).

    If training stops early, ``metrics.json`` says why (``status``): ``failed`` (bad input, with the
    error), ``diverged`` (NaN/inf loss) or ``interrupted`` (SIGINT/SIGTERM, with the resume command).

    Raises:
        ConfigError: bad config values, or a run dir that holds a run or cannot be written, before
            any data is read.
        DataError: missing or corrupt dataset files, before training starts.
        TrainingDiverged: the training loss became NaN/inf.
        RunInterrupted: SIGINT (Ctrl-C) or SIGTERM during the run.
    """
    out = Path(output_dir) if output_dir is not None else new_run_dir()
    resuming = ckpt_path is not None
    rank0 = rank_zero_only.rank == 0  # DDP: every process runs this; only rank 0 writes the run dir
    if rank0 and resuming:
        check_writable(out)
    elif rank0:  # before the try: an earlier run's metrics.json must not get this run's status
        check_new_run_dir(out)
    try:
        if cfg.get("test_ckpt") not in ("best", "last"):
            raise ConfigError(f"test_ckpt={cfg.get('test_ckpt')!r} must be 'best' or 'last'")
        if rank0 and not resuming:
            write_text_atomic(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        return _fit_and_report(cfg, out, ckpt_path, rank0, list(callbacks))
    except TrainingDiverged as e:
        if rank0:
            last = out / "checkpoints" / "last.ckpt"
            write_status(out, "diverged", e, epoch=e.epoch, step=e.step, lr=e.lr,
                         last_good_checkpoint=os.path.relpath(last, out) if last.is_file() else None)
        raise
    except (KeyboardInterrupt, SystemExit) as e:
        # Lightning turns Ctrl-C inside fit into sys.exit(1) and SIGTERM into SIGTERMException
        if isinstance(e, SystemExit) and not isinstance(e, SIGTERMException) and e.code != 1:
            raise
        signal_name = "SIGTERM" if isinstance(e, SIGTERMException) else "SIGINT"
        last = out / "checkpoints" / "last.ckpt"
        command = f"python -m mnist_lab.train resume={out}"
        message = (f"stopped by {signal_name}. The last complete epoch is in {last}; continue with: {command}"
                   if last.is_file() else
                   f"stopped by {signal_name} before the first epoch ended, so there is no checkpoint to "
                   f"resume from; start the run again (its settings: {out / 'config.yaml'})")
        if rank0:
            write_status(out, "interrupted", message, resume=command if last.is_file() else None)
        raise RunInterrupted(message, signal_name) from None
    except Exception as e:
        if rank0 and not resuming:  # a failed resume leaves the run's earlier status as it was
            write_status(out, "failed", e)
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
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"resume={run}: no config.yaml there, so it is not a run dir of mnist_lab.train "
                          "(those look like outputs/runs/<date>_<time>)")
    summary = run / "metrics.json"
    status = json.loads(summary.read_text()).get("status") if summary.is_file() else None
    if status == "completed":
        raise ConfigError(f"resume={run}: that run completed; there is nothing to resume. To train longer, "
                          "start a new run (e.g. with trainer.max_epochs=...)")
    if status == "diverged":
        raise ConfigError(f"resume={run}: that run diverged; from its last good checkpoint it would diverge "
                          "again the same way. Start a new run with a lower optimizer.lr")
    ckpt = run / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        raise ConfigError(f"resume={run}: there is no checkpoints/last.ckpt (the run stopped before its first "
                          f"epoch ended); start it again as a new run with the settings in {run / 'config.yaml'}")
    return train(OmegaConf.load(run / "config.yaml"), run, ckpt_path=ckpt)


def _fit_and_report(cfg: DictConfig, out: Path, ckpt_path: str | Path | None, rank0: bool,
                    more_callbacks: list) -> dict:
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, module = build(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")  # reads and checks the data now, before the trainer starts

    model_name = getattr(module.net, "name", type(module.net).__name__)
    if rank0 and ckpt_path is None and cfg.get("plots", True):
        x, y = datamodule.splits["train"]
        plot_samples(x[:25], y[:25], out / "samples.png", title="first 25 training digits")

    best = ModelCheckpoint(dirpath=out / "checkpoints", **cfg.callbacks.checkpoint)
    last = ModelCheckpoint(dirpath=out / "checkpoints", **cfg.callbacks.last_checkpoint)
    timer = Timer(verbose=False)  # train_seconds: the fit loop (training + validation epochs)
    callbacks = [best, last, timer, ResumeState(), DivergenceGuard(**cfg.callbacks.get("divergence", {}))]
    if cfg.callbacks.get("early_stopping"):
        callbacks.append(EarlyStopping(**cfg.callbacks.early_stopping))
    if cfg.trainer.get("enable_progress_bar", True) and cfg.callbacks.get("progress_bar"):
        callbacks.append(TQDMProgressBar(**cfg.callbacks.progress_bar))
    callbacks += [instantiate_checked(c) for c in (cfg.callbacks.get("extra") or {}).values()] + more_callbacks
    logger = CSVLogger(save_dir=str(out), name="", version="")
    if ckpt_path is not None and rank0:
        restore_history(logger, out, up_to_epoch=checkpoint_epoch(ckpt_path))
    trainer = instantiate_checked(cfg.trainer, callbacks=callbacks, default_root_dir=str(out), logger=logger)
    with warnings.catch_warnings():
        # CSVLogger warns that the run dir is not empty (we wrote config.yaml); it replaces only
        # metrics.csv. The logging-interval warning is about per-step logs, and we log per epoch.
        warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        train_seconds = timer.time_elapsed("train")
        epochs = trainer.current_epoch
        ckpt = best.best_model_path if cfg.test_ckpt == "best" else last.best_model_path
        tested = trainer.test(module, datamodule=datamodule, ckpt_path=ckpt or None, verbose=False)[0]

    history = read_epoch_metrics(out / "metrics.csv")
    val_loss = history.get("val/loss", {})
    best_epoch = min(val_loss, key=val_loss.get) if val_loss else None
    last_epoch = max(val_loss) if val_loss else None
    metrics = {
        "status": "completed",
        "model": model_name,
        **{k: float(tested[k]) for k in TEST_KEYS},
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
        "test_ckpt": os.path.relpath(ckpt, out) if ckpt else None,
        "device": str(trainer.strategy.root_device),
        "data_root": str(datamodule.root.resolve()),
        "run_dir": str(out),
    }
    if rank0:
        write_json(out / "metrics.json", metrics)  # first, so a failing evaluation loses nothing
        if cfg.get("plots", True):
            plot_curves(out / "metrics.csv", out / "curves.png", title=f"{model_name}")
            plot_confusion_matrix(module.test_confusion, out / "confusion_matrix.png",
                                  title=f"{model_name}: test confusion matrix ({cfg.test_ckpt} checkpoint)")
        if cfg.get("eval", {}).get("full", False) and ckpt:
            metrics.update(full_evaluation(ckpt, out, datamodule, cfg.eval, plots=cfg.get("plots", True)))
            write_json(out / "metrics.json", metrics)
        print(f"run dir: {out}")
        print(f"test/acc: {metrics['test/acc']:.4f}  ({model_name}, {epochs} epochs, {train_seconds:.1f} s)")
    return metrics


def full_evaluation(ckpt: str, out: Path, datamodule, eval_cfg, plots: bool = True) -> dict:
    """Run :func:`mnist_lab.evaluate.evaluate_checkpoint` on the tested checkpoint; returns the
    figures ``metrics.json`` gains: ECE, NLL, temperature, and robustness headline accuracies."""
    from mnist_lab.evaluate import evaluate_checkpoint, robustness_headline

    result = evaluate_checkpoint(ckpt, out, data_root=datamodule.root, seed=eval_cfg.seed,
                                 temperature=eval_cfg.temperature, max_images=eval_cfg.max_images, plots=plots)
    keep = ("test/ece", "test/nll", "temperature", "test/ece_scaled", "test/nll_scaled")
    return {**{k: result[k] for k in keep if k in result}, **robustness_headline(result["robustness"])}


def write_status(out: Path, status: str, error: BaseException | str, **extra) -> None:
    """Record in ``metrics.json`` why a run stopped early (``failed``, ``diverged``, ``interrupted``)
    and the error message; figures an earlier write put there (e.g. test metrics) are kept."""
    path = out / "metrics.json"
    try:
        old = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        old = {}
    error = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_json(path, {**old, "status": status, "error": error, **extra, "run_dir": str(out)})
    except OSError:
        pass  # the run dir itself is not writable: the message on stderr is all there is


def checkpoint_epoch(path: str | Path) -> int:
    """The epoch a Lightning checkpoint was saved in (0-based).

    Raises:
        ConfigError: the file cannot be read as a Lightning checkpoint.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        return int(ckpt["epoch"])
    except Exception as e:
        raise ConfigError(f"{path} cannot be read as a Lightning checkpoint ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); it may be truncated. Start a new run "
                          "instead of resuming") from None


def restore_history(logger: CSVLogger, out: Path, up_to_epoch: int) -> None:
    """Keep the rows of ``metrics.csv`` up to ``up_to_epoch`` when a run is resumed.

    Lightning's CSVLogger deletes an existing ``metrics.csv`` when it starts, so the rows are moved
    aside (``.metrics.csv.resume``, kept until they are written again: a resume killed here loses
    nothing) and logged again through the logger, which then appends the resumed epochs.
    """
    path, aside = out / "metrics.csv", out / ".metrics.csv.resume"
    if path.is_file() and not aside.is_file():
        os.replace(path, aside)
    if not aside.is_file():
        return
    with open(aside, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("epoch") and int(float(r["epoch"])) <= up_to_epoch]
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
            return resume(out)["test/acc"]
        return train(cfg, out)["test/acc"]
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
