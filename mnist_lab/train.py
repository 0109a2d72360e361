"""Training entry point: ``train(cfg, output_dir)`` and ``resume(run_dir)`` for code,
``python -m mnist_lab.train [overrides | resume=RUN_DIR]`` (or ``mnist-lab train``) for the shell."""

import sys
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.fabric.plugins.environments import ClusterEnvironment
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, open_dict

from mnist_lab.config import build, build_all
from mnist_lab.console import command, quiet_lightning
from mnist_lab.errors import ConfigError, RunInterrupted, check_bool, check_count, exit_with
from mnist_lab.plots import RunPlots
from mnist_lab.record import RunFiles, RunStatus
from mnist_lab.resuming import continuation, resume_run, sweep_command
from mnist_lab.rundir import RunDir
from mnist_lab.suite import EvaluationSuite
from mnist_lab.tuning import phases, tuned

#: what main() returns to a sweeper: selection on the validation split, never on the test set
OBJECTIVE = "best_val/acc"
#: callbacks every run needs: the checkpoints test_ckpt and resume= use, train_seconds' timer, exact resume
REQUIRED_CALLBACKS = ("best_checkpoint", "last_checkpoint", "timer", "resume_state")


def train(cfg: DictConfig, output_dir: str | Path | None = None, ckpt_path: str | Path | None = None,
          callbacks: Sequence[L.Callback] = ()) -> dict:
    """Build every object from its ``_target_`` node of ``cfg`` (``conf/train.yaml`` + overrides: the
    datamodule, the LightningModule with its network, optimizer and scheduler, the evaluation suite, the
    callbacks, the loggers, the trainer), ``Trainer.fit``, then ``Trainer.test`` of the tested checkpoint
    with the evaluation suite; returns the contents of ``metrics.json`` (:class:`~mnist_lab.rundir.RunFiles`).

    Args:
        output_dir: the run dir; ``None``: a new one under ``outputs/runs/``. It must not hold an earlier
            run, unless ``ckpt_path`` (a checkpoint of that run, what :func:`resume` passes) continues it.
        callbacks: more Lightning callbacks (objects; the config's ``callbacks`` takes ``_target_`` nodes).

    Under DDP every process runs this; rank 0 writes the run dir, the others return ``{"status": "completed"}``.

    Raises:
        ConfigError: bad config values, or a run dir that holds a run or cannot be written, before any data
            is read. DataError: missing or corrupt dataset files, before training starts.
        TrainingDiverged: the training loss became NaN/inf. RunInterrupted: SIGINT or SIGTERM.
    """
    quiet_lightning()
    resuming = ckpt_path is not None
    cfg = _with_run_dir(cfg, output_dir, resuming)
    status = RunStatus(RunDir(cfg.run_dir), resuming)
    with status.guard():
        _check(cfg)
        files = RunFiles(cfg, resuming)
        run_callbacks = [files, status, *([RunPlots(cfg.run_dir, resuming)] if cfg.get("plots") else [])]
        if cfg.get("threads"):
            torch.set_num_threads(cfg.threads)
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        datamodule = build(cfg.data, "data", base=L.LightningDataModule)
        module = build(cfg.module, "module", base=L.LightningModule)
        suite = build(cfg.eval, "eval", base=EvaluationSuite)
        named = build_all(cfg.callbacks, "callbacks", base=L.Callback)
        bar = cfg.trainer.enable_progress_bar  # Lightning refuses a progress bar callback without it
        trainer = build(cfg.trainer, "trainer", base=(L.Trainer, ClusterEnvironment),
                        logger=list(build_all(cfg.logger, "logger", base=Logger).values()),
                        callbacks=[*(c for c in named.values() if bar or not isinstance(c, ProgressBar)), suite,
                                   *run_callbacks, *callbacks])
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        if cfg.get("test", True):  # of the tested checkpoint; None: no epoch ended, the weights in memory
            tested = named[f"{cfg.test_ckpt}_checkpoint"].best_model_path or None
            trainer.test(module, dataloaders=suite.dataloaders(datamodule), ckpt_path=tested, weights_only=True,
                         verbose=False)
    if trainer.is_global_zero:
        key = "test/acc" if cfg.get("test", True) else "best_val/acc"
        print(f"run dir: {cfg.run_dir}")
        print(f"{key}: {files.metrics[key]:.4f}  ({module.name}, {trainer.current_epoch} epochs, "
              f"{files.metrics['train_seconds']:.1f} s)")
    return files.metrics


def _with_run_dir(cfg: DictConfig, output_dir: str | Path | None, resuming: bool) -> DictConfig:
    """A copy of ``cfg`` with ``run_dir`` set, after checking the dir: new (or, resuming, writable)."""
    run = RunDir(output_dir) if output_dir is not None else RunDir.new()
    if not resuming and cfg.get("run_dir") not in (None, str(run.path)):
        raise ConfigError(f"run_dir={cfg.run_dir} is filled in by mnist_lab.train; choose the run dir with "
                          "hydra.run.dir=... (train(cfg, output_dir) from Python)")
    if rank_zero_only.rank == 0:  # DDP: rank 0 made it; an earlier run is never overwritten
        run.check(resuming)
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.run_dir = str(run.path)
    return cfg


def _check(cfg: DictConfig) -> None:
    """The settings this module uses. Raises ConfigError: ``seed`` or ``threads`` not a non-negative
    integer, ``test_ckpt`` not best/last, ``test`` not a boolean, a required callback or the csv logger null."""
    for key, value in (("seed", cfg.seed), ("threads", cfg.get("threads"))):
        if value is not None:
            check_count(key, value, 0, f"{key}=42")
    check_bool("test", cfg.get("test", True))
    if cfg.get("test_ckpt") not in ("best", "last"):
        raise ConfigError(f"test_ckpt={cfg.get('test_ckpt')!r} must be 'best' or 'last'")
    missing = [name for name in REQUIRED_CALLBACKS if not cfg.callbacks.get(name)]
    if missing:
        raise ConfigError(f"callbacks.{missing[0]} is needed by every run; do not set it to null")
    if not (cfg.get("logger") or {}).get("csv"):
        raise ConfigError("logger.csv is needed by every run (metrics.csv is the run's history); keep it and add "
                          "others beside it, e.g. logger=[csv,tensorboard]")


def resume(run_dir: str | Path) -> dict:
    """Continue a killed or interrupted run in its own dir (:func:`mnist_lab.resuming.resume_run`); returns
    ``metrics.json``. Raises ConfigError: what cannot be continued, in one line."""
    plan = resume_run(run_dir)
    return train(plan.config, plan.run_dir, ckpt_path=plan.ckpt_path)


def main() -> None:
    """``python -m mnist_lab.train [overrides]``: train one run, or a ``-m`` sweep (a study with ``nuisance``:
    two, :func:`~mnist_lab.tuning.phases`); ``resume=RUN_DIR`` continues a killed or interrupted run,
    ``-m resume=SWEEP_DIR`` a sweep (:func:`~mnist_lab.resuming.sweep_command`). Bad input: one line and the
    error's exit code."""
    try:
        sweeps = phases(sweep_command(sys.argv))
    except ConfigError as e:
        exit_with(e)
    for i, argv in enumerate(sweeps):
        sys.argv = argv
        GlobalHydra.instance().clear()
        try:
            job()
        except SystemExit as e:  # a nuisance trial that failed or diverged is a result: the final runs go on
            if i == len(sweeps) - 1 or e.code != 1:
                raise


@command("train")
def job(cfg: DictConfig) -> float | None:
    """One run, or one job of a sweep. Returns the best validation accuracy (:data:`OBJECTIVE`, what a sweeper
    such as Optuna maximises), or None for a failed job of a sweep, which is recorded in its ``metrics.json``;
    the sweep goes on. Ctrl-C stops the whole sweep."""
    hc = HydraConfig.get()
    out, multirun = Path(hc.runtime.output_dir), hc.mode == RunMode.MULTIRUN
    try:
        plan = continuation(cfg, out, multirun, hc.overrides.task)
        if plan.done is not None:
            return plan.done.get(OBJECTIVE)
        config = tuned(plan.config, hc.overrides.task, Path(hc.sweep.dir)) if multirun else plan.config
        return train(config, plan.run_dir, ckpt_path=plan.ckpt_path).get(OBJECTIVE)
    except Exception as e:
        if not multirun or isinstance(e, RunInterrupted):
            raise
        print(f"job {hc.job.override_dirname or hc.job.num} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return None


if __name__ == "__main__":
    main()
