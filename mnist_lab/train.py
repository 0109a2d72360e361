"""Training entry point: ``train(cfg, output_dir)`` for code, ``python -m mnist_lab.train`` for the shell.

``train`` builds everything from a composed config (see :func:`mnist_lab.config.load_config`),
checks the config and the data before training starts, fits, tests the best checkpoint and
writes the run dir:

- ``config.yaml``: the resolved config (Hydra's ``.hydra/`` folder is there too on the CLI);
- ``checkpoints/best.ckpt`` (lowest ``val/loss``) and ``checkpoints/last.ckpt``;
- ``metrics.csv``: per-epoch metrics (Lightning's CSVLogger);
- ``metrics.json``: the run's summary (test metrics, parameter count, timing, splits, seed, ...);
- ``curves.png``, ``confusion_matrix.png``, ``samples.png``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, Timer, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from mnist_lab.config import instantiate_checked
from mnist_lab.errors import ConfigError, MnistLabError
from mnist_lab.models import count_parameters
from mnist_lab.module import Classifier
from mnist_lab.plots import plot_confusion_matrix, plot_curves, plot_samples, read_epoch_metrics

TEST_KEYS = ("test/acc", "test/loss", "test/precision_macro", "test/recall_macro", "test/f1_macro")


def new_run_dir(base: str | Path = "outputs/runs") -> Path:
    """A fresh, timestamped run dir (to the microsecond, so two runs never share one)."""
    return Path(base) / dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (temp file + rename): readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


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
        **cfg.get("speed", {}),
    )
    return datamodule, module


def train(cfg: DictConfig, output_dir: str | Path | None = None) -> dict:
    """Train, test and report one run; returns the contents of ``metrics.json``.

    Args:
        cfg: composed config (``conf/train.yaml`` + overrides).
        output_dir: the run dir; ``None`` makes a new one under ``outputs/runs/``.

    Raises:
        ConfigError: bad config values, before any data is read.
        DataError: missing or corrupt dataset files, before training starts.
    """
    if cfg.get("test_ckpt") not in ("best", "last"):
        raise ConfigError(f"test_ckpt={cfg.get('test_ckpt')!r} must be 'best' or 'last'")
    out = Path(output_dir) if output_dir is not None else new_run_dir()
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    except OSError as e:
        raise ConfigError(f"cannot write the run dir {out}: {e.strerror}; choose a writable "
                          "hydra.run.dir=... (or output_dir)") from None

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, module = build(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")  # reads and checks the data now, before the trainer starts

    model_name = getattr(module.net, "name", type(module.net).__name__)
    if cfg.get("plots", True):
        x, y = datamodule.splits["train"]
        plot_samples(x[:25], y[:25], out / "samples.png", title="first 25 training digits")

    checkpoint = ModelCheckpoint(dirpath=out / "checkpoints", **cfg.callbacks.checkpoint)
    timer = Timer(verbose=False)  # train_seconds: the fit loop (training + validation epochs)
    callbacks = [checkpoint, timer]
    if cfg.callbacks.get("early_stopping"):
        callbacks.append(EarlyStopping(**cfg.callbacks.early_stopping))
    if cfg.trainer.get("enable_progress_bar", True) and cfg.callbacks.get("progress_bar"):
        callbacks.append(TQDMProgressBar(**cfg.callbacks.progress_bar))
    trainer = instantiate_checked(cfg.trainer, callbacks=callbacks, default_root_dir=str(out),
                                  logger=CSVLogger(save_dir=str(out), name="", version=""))
    with warnings.catch_warnings():
        # CSVLogger warns that the run dir is not empty (we wrote config.yaml); it replaces only
        # metrics.csv. The logging-interval warning is about per-step logs, and we log per epoch.
        warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        trainer.fit(module, datamodule=datamodule)
        train_seconds = timer.time_elapsed("train")
        epochs = trainer.current_epoch
        ckpt = checkpoint.best_model_path if cfg.test_ckpt == "best" else checkpoint.last_model_path
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
    if trainer.is_global_zero:
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


def record_failure(out: Path, error: BaseException) -> None:
    """Write ``metrics.json`` with ``status: failed`` and the error, so a sweep summary lists the job."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "metrics.json", {"status": "failed", "error": f"{type(error).__name__}: {error}",
                                          "run_dir": str(out)})
    except OSError:
        pass  # the run dir itself is not writable: the message on stderr is all there is


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """``python -m mnist_lab.train [overrides]``: train one run, or one job of a ``-m`` sweep.

    A single run that fails on bad input prints one line and exits with code 2. In a sweep, a failed
    job is recorded in its ``metrics.json`` and the sweep goes on; the summary lists it.
    """
    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    try:
        return train(cfg, out)["test/acc"]
    except Exception as e:
        record_failure(out, e)
        if hc.mode == RunMode.MULTIRUN:
            print(f"job {hc.job.override_dirname or hc.job.num} failed: {type(e).__name__}: {e}", file=sys.stderr)
            return None
        if isinstance(e, MnistLabError):
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
