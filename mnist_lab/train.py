"""Training entry point: ``train(cfg, output_dir)`` and ``resume(run_dir)`` for code,
``python -m mnist_lab.train [overrides | resume=RUN_DIR]`` (or ``mnist-lab train``) for the shell.

``train`` builds every object from its ``_target_`` node of the composed config: the datamodule
(``data``), the LightningModule (``module``: ``model``, ``optimizer``, ``scheduler``), the evaluation
suite (``eval``), the callbacks, the loggers and the trainer; then ``Trainer.fit``, and ``Trainer.test``
of the tested checkpoint. Callbacks write the run dir (:mod:`mnist_lab.rundir` lists its files).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from lightning.fabric.plugins.environments import ClusterEnvironment
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from mnist_lab.callbacks import RunRecord
from mnist_lab.config import CONF_DIR, build, build_all
from mnist_lab.console import quiet_lightning
from mnist_lab.errors import ConfigError, MnistLabError, RunInterrupted, exit_with
from mnist_lab.evaluation import EvaluationSuite
from mnist_lab.rundir import RunDir, check_writable, read_checkpoint

#: what main() returns to a sweeper: selection on the validation split, never on the test set
OBJECTIVE = "best_val/acc"
#: callbacks every run needs: the checkpoints test_ckpt and resume= use, train_seconds' timer, exact resume
REQUIRED_CALLBACKS = ("best_checkpoint", "last_checkpoint", "timer", "resume_state")


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

    Under DDP every process runs this; rank 0 writes the run dir, the others return ``{"status": "completed"}``.

    Raises:
        ConfigError: bad config values, or a run dir that holds a run or cannot be written, before
            any data is read.
        DataError: missing or corrupt dataset files, before training starts.
        TrainingDiverged: the training loss became NaN/inf.
        RunInterrupted: SIGINT (Ctrl-C) or SIGTERM during the run.
    """
    quiet_lightning()
    resuming = ckpt_path is not None
    cfg = _with_run_dir(cfg, output_dir, resuming)
    with RunRecord(cfg, resuming).recording() as record:
        _check(cfg)
        tested_by, bar = f"{cfg.test_ckpt}_checkpoint", cfg.trainer.enable_progress_bar
        if cfg.get("threads"):
            torch.set_num_threads(cfg.threads)
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        datamodule = build(cfg.data, "data", base=L.LightningDataModule)
        module = build(cfg.module, "module", base=L.LightningModule)
        suite = build(cfg.eval, "eval", base=EvaluationSuite)
        named = build_all(cfg.callbacks, "callbacks", base=L.Callback)
        kept = [c for c in named.values() if bar or not isinstance(c, ProgressBar)]  # Lightning refuses a bar then
        loggers = list(build_all(cfg.logger, "logger", base=Logger).values())
        trainer = build(cfg.trainer, "trainer", base=(L.Trainer, ClusterEnvironment), logger=loggers,
                        callbacks=[*kept, suite, record, *callbacks])
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        tested = named[tested_by].best_model_path or None  # None: no epoch completed, the weights in memory
        trainer.test(module, dataloaders=suite.dataloaders(datamodule), ckpt_path=tested, weights_only=True,
                     verbose=False)
    if trainer.is_global_zero:
        print(f"run dir: {record.run.path}")
        print(f"test/acc: {record.metrics['test/acc']:.4f}  ({module.name}, {trainer.current_epoch} epochs, "
              f"{record.metrics['train_seconds']:.1f} s)")
    return record.metrics


def _with_run_dir(cfg: DictConfig, output_dir: str | Path | None, resuming: bool) -> DictConfig:
    """A copy of ``cfg`` with ``run_dir`` set, after checking the dir: new (or, resuming, writable)."""
    run = RunDir(output_dir) if output_dir is not None else RunDir.new()
    if not resuming and cfg.get("run_dir") not in (None, str(run.path)):
        raise ConfigError(f"run_dir={cfg.run_dir} is filled in by mnist_lab.train; choose the run dir with "
                          "hydra.run.dir=... (train(cfg, output_dir) from Python)")
    if rank_zero_only.rank == 0:  # DDP: rank 0 made it; an earlier run is never overwritten
        check_writable(run.path) if resuming else run.check_new()
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.run_dir = str(run.path)
    return cfg


def _check(cfg: DictConfig) -> None:
    """The settings this module uses. Raises ConfigError: ``seed`` or ``threads`` not a non-negative
    integer, ``test_ckpt`` not best/last, a required callback or the csv logger set to null."""
    for key, value in (("seed", cfg.seed), ("threads", cfg.get("threads"))):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ConfigError(f"{key}={value!r} must be a non-negative integer, e.g. {key}=42")
    if cfg.get("test_ckpt") not in ("best", "last"):
        raise ConfigError(f"test_ckpt={cfg.get('test_ckpt')!r} must be 'best' or 'last'")
    missing = [name for name in REQUIRED_CALLBACKS if not cfg.callbacks.get(name)]
    if missing:
        raise ConfigError(f"callbacks.{missing[0]} is needed by every run; do not set it to null")
    if not (cfg.get("logger") or {}).get("csv"):
        raise ConfigError("logger.csv is needed by every run (metrics.csv is the run's history); keep it and add "
                          "others beside it, e.g. logger=[csv,tensorboard]")


def resume(run_dir: str | Path) -> dict:
    """Continue a killed or interrupted run in its own run dir from ``checkpoints/last.ckpt`` (every
    epoch's end) with its own ``config.yaml``; returns ``metrics.json``. Epoch, optimizer, LR scheduler,
    early stopping, timer and RNG states come from the checkpoint and ``metrics.csv`` keeps its rows up to
    it, so on CPU with ``trainer.deterministic=true`` the run ends with the uninterrupted run's metrics.
    Do not move the run dir first (the checkpoint callbacks restore their state only where they wrote).

    Raises:
        ConfigError: not a run dir, a run that completed or diverged, no checkpoint or one refused or unreadable.
    """
    run = RunDir(run_dir)
    if (run.path / "multirun.yaml").is_file():
        raise ConfigError(f"resume={run.path} is a sweep dir: continue the sweep with python -m mnist_lab.train -m "
                          f"resume={run.path}")
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
    read_checkpoint(ckpt)  # a safe load first (tensors memory-mapped): an unusable file is refused in one line
    return train(OmegaConf.load(run.config), run.path, ckpt_path=ckpt)


def resume_job(cfg: DictConfig, job_dir: Path) -> float | None:
    """One job of a resumed sweep, in its own job dir: a completed (or diverged) job is skipped and its
    files are left as they are; an interrupted or killed one continues from its ``last.ckpt``
    (:func:`resume`); a failed one, or one that never started or saved no checkpoint, runs again from
    the start (its earlier files removed). Returns the job's :data:`OBJECTIVE`."""
    run = RunDir(job_dir)
    metrics = run.read_metrics()
    status = metrics.get("status")
    if status in ("completed", "diverged"):
        print(f"job {job_dir.name}: {status} before, skipped")
        return metrics.get(OBJECTIVE)
    if status in (None, "interrupted") and run.config.is_file() and run.checkpoint("last").is_file():
        return resume(job_dir).get(OBJECTIVE)
    for leftover in (run.config, run.metrics, run.history):
        leftover.unlink(missing_ok=True)
    shutil.rmtree(run.checkpoints, ignore_errors=True)
    if not (job_dir / ".hydra").is_dir():  # never started: Hydra's record where the sweep keeps its jobs' (summaries)
        shutil.copytree(job_dir / ".hydra_resume", job_dir / ".hydra")
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.resume = None
    return train(cfg, job_dir).get(OBJECTIVE)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """``python -m mnist_lab.train [overrides]``: train one run, or one job of a ``-m`` sweep;
    ``resume=RUN_DIR`` continues a killed or interrupted run, ``-m resume=SWEEP_DIR`` a sweep (each job:
    :func:`resume_job`).

    Returns the best validation accuracy (:data:`OBJECTIVE`, what a sweeper such as Optuna maximises), or
    None for a failed job of a sweep. Bad input: one line and the error's exit code (2: config or data,
    3: diverged; 130/143: SIGINT/SIGTERM). A failed job of a sweep is recorded in its ``metrics.json``
    and the sweep goes on; the summary lists it. Ctrl-C stops the whole sweep.
    """
    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        if multirun and (cfg.get("resume") or RunDir(out).config.is_file()):  # a job of a resumed sweep, or
            return resume_job(cfg, out)  # one a cluster requeued (its dir holds its run): it goes on
        if cfg.get("resume"):
            others = [o.input_line for o in OverridesParser.create().parse_overrides(list(hc.overrides.task))
                      if o.key_or_group != "resume"]
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
