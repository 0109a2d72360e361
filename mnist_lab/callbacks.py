"""The callbacks mnist_lab adds to a run: two for Lightning (exact resume, a stop on divergence)
and one for Hydra (a run dir is never reused).

Everything else (checkpoints, early stopping, timing, progress) is Lightning's own callbacks; all of
them are ``_target_`` nodes under ``callbacks:`` (``conf/callbacks/default.yaml``).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra.experimental.callback import Callback as HydraCallback
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from mnist_lab.errors import ConfigError, TrainingDiverged, exit_with
from mnist_lab.rundir import RunDir, check_writable


class ResumeState(L.Callback):
    """What a checkpoint needs, beyond Lightning's own state, for a resumed run to continue exactly
    as the uninterrupted run would have.

    - RNG states: torch (CPU and every CUDA device), numpy and Python ``random`` are saved in every
      checkpoint and restored on resume, so dropout masks after the resume are the ones the
      uninterrupted run draws. (Shuffling and augmentation use their own per-epoch generators, see
      :class:`mnist_lab.data.InMemoryBatches`.)
    - Logs: the loggers are flushed at the start of every epoch, so ``metrics.csv`` on disk holds
      every completed epoch when a run is killed (Lightning otherwise writes every 50 steps).
    - Early stopping: a run that early stopping had already ended (and was killed while testing)
      does not train one more epoch when resumed.
    """

    def state_dict(self) -> dict:
        # tensors, ints and tuples only: checkpoints stay loadable with torch.load(weights_only=True)
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
            "python": random.getstate(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        torch.set_rng_state(state_dict["torch"])
        if state_dict["cuda"] and torch.cuda.is_available() and len(state_dict["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state_dict["cuda"])
        kind, keys, pos, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        random.setstate(state_dict["python"])

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if any(isinstance(cb, EarlyStopping) and cb.stopped_epoch > 0 for cb in trainer.callbacks):
            trainer.should_stop = True

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for logger in trainer.loggers:
            logger.save()


class DivergenceGuard(L.Callback):
    """Stop training with :class:`~mnist_lab.errors.TrainingDiverged` when the training loss is NaN,
    inf, or above ``max_loss``.

    ``max_loss`` catches the divergence that stays finite: with Adam at ``optimizer.lr=1e6`` the
    mean cross-entropy jumps to 1e15-1e30 within two steps (fc, conv2 on MNIST) and never becomes
    NaN. A healthy run starts at ln(10) = 2.3 and only goes down; a batch mean of 1e4 means logit
    margins of ~1e4 on wrong answers, i.e. weights that have blown up.

    The check runs every ``check_every_n_steps`` optimizer steps and always before validation and
    at the end of an epoch, i.e. before any checkpoint of the diverged weights could be written:
    ``checkpoints/last.ckpt`` keeps the last good epoch. Each check reads one flag from the device
    (a host sync): free on a CPU; on a GPU a larger interval keeps the step loop asynchronous.

    Args:
        check_every_n_steps: steps between checks (1: every step, so the message names the step).
        max_loss: a batch's mean training loss above this counts as divergence (``null``: NaN/inf only).

    Raises:
        TrainingDiverged: from the step loop, with the epoch, step, loss, learning rate and the fix.
    """

    def __init__(self, check_every_n_steps: int = 1, max_loss: float | None = 1e4):
        if not isinstance(check_every_n_steps, int) or check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps={check_every_n_steps!r} must be a positive integer")
        self.every, self.max_loss = check_every_n_steps, max_loss
        self._bad: torch.Tensor | None = None  # any bad loss since the last check (a flag on the device)
        self._loss: torch.Tensor | None = None  # the last loss (losses, with steps_per_execution > 1) seen
        self._checked_at = 0  # global step of the last check

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        self._loss = loss.detach()  # (), or (K,) for K mini-batch steps in one training step
        if self.every == 1:  # one read per step: a few microseconds on a CPU
            values = self._loss.flatten().tolist()
            if any(not math.isfinite(v) or (self.max_loss is not None and v > self.max_loss) for v in values):
                self._raise(trainer)
            return
        bad = ~torch.isfinite(self._loss).all()  # on the device, read at the next check
        if self.max_loss is not None:
            bad = bad | (self._loss > self.max_loss).any()
        self._bad = bad if self._bad is None else self._bad | bad
        if trainer.global_step - self._checked_at >= self.every:
            self._check(trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._check(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._check(trainer)

    def _check(self, trainer: L.Trainer) -> None:
        bad, self._bad, self._checked_at = self._bad, None, trainer.global_step
        if bad is not None and bool(bad):
            self._raise(trainer)

    def _raise(self, trainer: L.Trainer) -> None:
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        where = (f"at global step {trainer.global_step}" if self.every == 1
                 else f"within the {self.every} steps before global step {trainer.global_step}")
        limit = f"NaN/inf or above {self.max_loss:g}" if self.max_loss is not None else "NaN/inf"
        saved = next((Path(cb.best_model_path).name for cb in reversed(trainer.checkpoint_callbacks)
                      if getattr(cb, "best_model_path", "")), None)
        kept = (f"checkpoints/{saved} keeps the last good epoch" if saved
                else "no epoch had completed, so no checkpoint was written")
        raise TrainingDiverged(
            f"training diverged: the training loss became {self._worst():.4g} ({limit}) in epoch "
            f"{trainer.current_epoch}, {where}, at learning rate {lr:g}. Training stopped; {kept}. "
            "Lower optimizer.lr (e.g. by 10x), or clip gradients with trainer.gradient_clip_val=1.0.",
            epoch=trainer.current_epoch, step=trainer.global_step, lr=lr)


    def _worst(self) -> float:
        values = self._loss.flatten().tolist()
        return next((v for v in values if not math.isfinite(v)), max(values))


class RunDirGuard(HydraCallback):
    """Hydra callback: before Hydra writes anything, refuse (exit code 2, one line) a run dir
    (``hydra.run.dir=...``) that holds an earlier run, a sweep dir that holds an earlier sweep, and
    a dir that cannot be written."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        if rank_zero_only.rank != 0:  # DDP: rank 0 already made the run dir
            return
        run_dir = Path(config.hydra.run.dir)
        try:
            if not config.get("resume"):
                RunDir(run_dir).check_new()
            elif not run_dir.is_dir():
                raise ConfigError(f"resume={run_dir}: there is no such run dir")
            else:
                check_writable(run_dir)
        except ConfigError as e:
            exit_with(e)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            if sweep_dir.is_dir() and next(sweep_dir.rglob(".hydra/overrides.yaml"), None) is not None:
                raise ConfigError(f"the sweep dir {sweep_dir} already holds a sweep; give a new hydra.sweep.dir "
                                  "(or leave it out for a fresh outputs/sweeps/<date>_<time>). Resume its jobs "
                                  "one at a time with resume=<job dir>")
            check_writable(sweep_dir, "sweep dir", "hydra.sweep.dir=...")
        except ConfigError as e:
            exit_with(e)
