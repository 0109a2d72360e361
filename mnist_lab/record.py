"""The run record, written through Lightning's hooks into the run dir (:mod:`mnist_lab.rundir`): its files
(:class:`RunFiles`) and its status on failure (:class:`RunStatus`); its figures: :class:`mnist_lab.plots.RunPlots`."""

import os
from collections.abc import Iterator
from contextlib import contextmanager

import lightning as L
import pandas as pd
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from omegaconf import DictConfig, OmegaConf

from mnist_lab.errors import ConfigError, RunInterrupted, TrainingDiverged
from mnist_lab.rundir import RunDir, column, provenance, read_history, sweep_root, write_json, write_text_atomic


class RunStatus(L.Callback):
    """Why a run stopped early, in ``metrics.json``: ``diverged`` (the epoch, step, learning rate and last
    good checkpoint), ``interrupted`` (the command that resumes it) or ``failed`` (the error). A resumed run
    that fails leaves its earlier status as it was.

    Lightning tells the callback what happened inside fit and test (``on_exception``); :meth:`guard`, around
    the whole run (lightning-hydra-template's ``task_wrapper``), records errors before fit (while objects
    are built) and turns Lightning's answer to an interrupt (``sys.exit(1)`` after Ctrl-C,
    ``SIGTERMException``) into :class:`~mnist_lab.errors.RunInterrupted`, and its refusal of a setting
    (``MisconfigurationException``) into a :class:`~mnist_lab.errors.ConfigError`.
    """

    def __init__(self, run: RunDir, resuming: bool = False):
        self.run, self.resuming, self.recorded = run, resuming, False
        self.interruption: RunInterrupted | None = None

    @contextmanager
    def guard(self) -> Iterator["RunStatus"]:
        try:
            yield self
        except SystemExit:  # SIGTERMException is one
            if self.interruption is None:
                raise
            raise self.interruption from None
        except Exception as e:
            self._record("failed", e)
            if isinstance(e, MisconfigurationException):
                raise ConfigError(f"Lightning refuses these settings: {e}") from None
            raise

    def _record(self, status: str, error: BaseException | str, **extra) -> None:
        if not self.recorded and not (status == "failed" and self.resuming) and rank_zero_only.rank == 0:
            self.run.write_status(status, error, **extra)
        self.recorded = True

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        last = self.run.checkpoint("last")
        if isinstance(exception, TrainingDiverged):
            self._record("diverged", exception, epoch=exception.epoch, step=exception.step, lr=exception.lr,
                         last_good_checkpoint=os.path.relpath(last, self.run.path) if last.is_file() else None)
        elif isinstance(exception, KeyboardInterrupt | SIGTERMException):
            signal_name = "SIGTERM" if isinstance(exception, SIGTERMException) else "SIGINT"
            sweep = sweep_root(self.run.path)  # a job of a sweep continues with the whole sweep (or study)
            command = (f"python -m mnist_lab.train -m resume={sweep}" if sweep
                       else f"python -m mnist_lab.train resume={self.run.path}")
            message = (f"stopped by {signal_name}. The last complete epoch is in {last}; continue with: {command}"
                       if last.is_file() else
                       f"stopped by {signal_name} before the first epoch ended, so there is no checkpoint to "
                       f"resume from; start the run again (its settings: {self.run.config})")
            self.interruption = RunInterrupted(message, signal_name)
            self._record("interrupted", message, resume=command if last.is_file() else None)
        else:
            self._record("failed", exception)


class RunFiles(L.Callback):
    """The run dir's files, by rank 0: ``config.yaml`` (the resolved ``config``) when fit starts (a
    resumed run keeps its own), and when the test ends ``metrics.json`` (status ``completed``, every
    ``test/`` and ``robustness/`` figure the test logged, the figures of the best checkpoint's epoch (by its
    ``monitor`` and ``mode``) and of the last, parameters, FLOPs, timings, data and provenance) and the
    run's settings and results in TensorBoard's HPARAMS tab (with ``config.test`` false: when fit ends).
    :attr:`metrics` is then what ``metrics.json`` holds. ``config.run_dir`` is the run dir."""

    def __init__(self, config: DictConfig, resuming: bool = False):
        self.config, self.resuming, self.run = config, resuming, RunDir(config.run_dir)
        self.metrics: dict = {"status": "completed"}
        self._train_seconds = 0.0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and not self.resuming:
            write_text_atomic(self.run.config, OmegaConf.to_yaml(self.config, resolve=True))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # read now: Trainer.test restores the tested checkpoint's callback states, the Timer's too
        self._train_seconds = next(c for c in trainer.callbacks if isinstance(c, Timer)).time_elapsed("train")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.config.get("test", True):  # a run that reads no test split is recorded when fit ends
            self.on_test_end(trainer, pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        epochs = read_history(self.run.history, by="epoch")
        ckpt = trainer.checkpoint_callback  # the best checkpoint (the first ModelCheckpoint): its monitor and mode
        monitor, mode = (ckpt.monitor, ckpt.mode) if ckpt is not None and ckpt.monitor else ("val/loss", "min")
        val = column(epochs, monitor)
        best, last = (int(val.idxmin() if mode == "min" else val.idxmax()), int(val.index.max())) if len(val) \
            else (None, None)

        def at(key: str, epoch: int | None) -> float | None:
            value = epochs[key].get(epoch) if epoch is not None else None
            return None if value is None or pd.isna(value) else float(value)
        seconds, n, net = self._train_seconds, trainer.current_epoch, getattr(pl_module, "net", pl_module)
        self.metrics = {
            "status": "completed", "model": getattr(pl_module, "name", type(net).__name__),
            "architecture": type(net).__name__,
            **{k: float(v) for k, v in trainer.callback_metrics.items()
               if k.startswith(("test/", "robustness/")) or k == "temperature"},
            "best_epoch": best,
            **{f"best_{k}": at(k, best) for k in ("val/loss", "val/acc", "val/f1_macro") if k in epochs},
            **{f"last_{k}": at(k, last) for k in ("train/loss", "train/acc", "val/loss", "val/acc") if k in epochs},
            "params_trainable": sum(p.numel() for p in net.parameters() if p.requires_grad),
            "flops_per_image": pl_module.flops_per_image(),
            "train_seconds": round(seconds, 3), "seconds_per_epoch": round(seconds / max(n, 1), 3),
            "steps_per_execution": getattr(pl_module, "steps_per_execution", 1), "epochs": n,
            "seed": self.config.seed, **trainer.datamodule.describe(),
            "test_ckpt": os.path.relpath(trainer.ckpt_path, self.run.path)
            if trainer.ckpt_path and self.config.get("test", True) else None,
            "device": str(trainer.strategy.root_device), **provenance(trainer.strategy.root_device),
            "run_dir": str(self.run.path),
        }
        write_json(self.run.metrics, self.metrics)
        settings = {**pl_module.hparams, "data": trainer.datamodule.hparams, "seed": self.config.seed, "epochs": n}
        results = {f"hparams/{k}": self.metrics[k] for k in ("best_val/acc", "test/acc") if k in self.metrics}
        for logger in trainer.loggers:  # TensorBoard's HPARAMS tab: the run's settings against its results
            if isinstance(logger, TensorBoardLogger):
                logger.log_hyperparams(settings, results)
