"""Resume, all of it: a killed or interrupted run (``resume=RUN_DIR``), a job of a resumed sweep, a whole
sweep (``-m resume=SWEEP_DIR``), an Optuna search, and what a checkpoint needs to continue exactly.
"""

import random
import shutil
from pathlib import Path
from typing import NamedTuple

import lightning as L
import numpy as np
import torch
from hydra.experimental.callback import Callback
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from mnist_lab.config import parse_overrides
from mnist_lab.errors import ConfigError, exit_with
from mnist_lab.rundir import RunDir, check_writable, read_checkpoint, read_history

# `${mnist_lab.if_resume:${resume},A,B}`: A when resume= is set, else B (conf/train.yaml's hydra run dir)
OmegaConf.register_new_resolver("mnist_lab.if_resume", lambda resume, then, otherwise: then if resume else otherwise,
                                replace=True)


class Continuation(NamedTuple):
    """What to do in a dir that holds a run: train ``config`` into ``run_dir`` from ``ckpt_path`` (None: from
    the start), or nothing, when ``done`` holds the metrics of a job that ended before."""

    config: DictConfig | None
    run_dir: Path
    ckpt_path: Path | None = None
    done: dict | None = None


def refuse_others(overrides, what: str) -> None:
    """Refuse overrides beside ``resume=``: a resumed run or sweep keeps its own config.

    Raises:
        ConfigError: naming the other overrides and the fix.
    """
    others = [line for key, _, line in parse_overrides(overrides) if key != "resume"]
    if others:
        raise ConfigError(f"resume={what} continues with its own config; drop the other overrides "
                          f"({' '.join(others)}), or start anew with them")


def resume_run(run_dir: str | Path) -> Continuation:
    """A killed or interrupted run continued in its own dir from ``checkpoints/last.ckpt`` with its own
    ``config.yaml``. Epoch, optimizer, LR scheduler, early stopping, timer and RNG states come from the
    checkpoint and ``metrics.csv`` keeps its rows up to it, so on CPU with ``trainer.deterministic=true`` the
    run ends with the uninterrupted run's metrics. Do not move the run dir first.

    Raises:
        ConfigError: a sweep dir, not a run dir, a run that completed or diverged, no checkpoint or one that
            is refused or unreadable.
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
    return Continuation(OmegaConf.load(run.config), run.path, ckpt)


def resume_job(config: DictConfig, job_dir: Path) -> Continuation:
    """One job of a resumed sweep, in its own job dir: a completed (or diverged) job is left as it is; an
    interrupted or killed one continues from its ``last.ckpt``; a failed one, or one that never started
    or saved no checkpoint, runs again from the start (its earlier files removed)."""
    run = RunDir(job_dir)
    metrics = run.read_metrics()
    if metrics.get("status") in ("completed", "diverged"):
        print(f"job {job_dir.name}: {metrics['status']} before, skipped")
        return Continuation(None, job_dir, done=metrics)
    if metrics.get("status") in (None, "interrupted") and run.config.is_file() and run.checkpoint("last").is_file():
        return resume_run(job_dir)
    for leftover in (run.config, run.metrics, run.history):
        leftover.unlink(missing_ok=True)
    shutil.rmtree(run.checkpoints, ignore_errors=True)
    if not (job_dir / ".hydra").is_dir():  # never started: Hydra's record where the sweep keeps its jobs' (summaries)
        shutil.copytree(job_dir / ".hydra_resume", job_dir / ".hydra")
    config = config.copy()
    with open_dict(config):
        config.resume = None
    return Continuation(config, job_dir)


def continuation(config: DictConfig, out: Path, multirun: bool, overrides) -> Continuation:
    """What ``python -m mnist_lab.train`` trains in its output dir ``out``: with ``resume=``, the run
    (:func:`resume_run`; no ``overrides`` beside it), in a sweep the job (:func:`resume_job`, also a job a
    cluster requeued, whose dir holds its run), else a new run of ``config``."""
    if multirun and (config.get("resume") or RunDir(out).config.is_file()):
        return resume_job(config, out)
    if config.get("resume"):
        refuse_others(overrides, config.resume)
        return resume_run(out)
    return Continuation(config, out)


class ResumeState(L.Callback):
    """What a checkpoint needs, beyond Lightning's state, for a resumed run to continue exactly as the
    uninterrupted run: the torch (CPU, CUDA), numpy and Python RNG states (dropout masks; shuffling and
    augmentation have their own per-epoch generators), and a run that early stopping had ended (killed while
    testing) trains no further epoch. When fit restores a checkpoint, ``metrics.csv`` gets its rows back up
    to the checkpoint's epoch (Lightning's CSVLogger starts the file anew), written through the logger.

    Args:
        history: the run's ``metrics.csv``, read here, before fit starts a new one.
    """

    def __init__(self, history: str | Path | None = None):
        self.rows = read_history(history) if history is not None else None

    def state_dict(self) -> dict:
        # tensors, ints and tuples only: checkpoints stay loadable with torch.load(weights_only=True)
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        return {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
                "python": random.getstate()}

    def load_state_dict(self, state_dict: dict) -> None:
        torch.set_rng_state(state_dict["torch"])
        if state_dict["cuda"] and torch.cuda.is_available() and len(state_dict["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state_dict["cuda"])
        kind, keys, pos, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        random.setstate(state_dict["python"])

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.state.fn != TrainerFn.FITTING or self.rows is None or self.rows.empty:
            return  # Trainer.test restores the tested checkpoint too
        rows = self.rows
        kept = rows[rows["epoch"] <= int(checkpoint["epoch"])]
        kept_steps = kept["step"].max() if len(kept) else -1  # and the learning rate's rows (no epoch) up to them
        rows = rows[rows.index.isin(kept.index) | (rows["epoch"].isna() & (rows["step"] <= kept_steps))]
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                for row in rows.to_dict("records"):
                    values = {k: int(v) if k == "epoch" else v for k, v in row.items() if k != "step" and v == v}
                    logger.log_metrics(values, step=int(row["step"]))
                logger.save()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if any(isinstance(cb, EarlyStopping) and cb.stopped_epoch > 0 for cb in trainer.callbacks):
            trainer.should_stop = True


class RunDirGuard(Callback):
    """Hydra callback: before Hydra writes anything, refuse (exit code 2, one line) a run dir that holds an
    earlier run, a sweep dir that holds an earlier sweep, and a dir that cannot be written; and save a
    sweep's config (``multirun.yaml``), which ``-m resume=<sweep dir>`` continues.
    Hydra turns an exception in a callback into a warning and exits 0: this exits itself."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        if rank_zero_only.rank != 0:  # DDP: rank 0 already made the run dir
            return
        try:
            RunDir(config.hydra.run.dir).check(resuming=bool(config.get("resume")))
        except ConfigError as e:
            exit_with(e)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            check_sweep_dir(sweep_dir, config.get("resume"))
        except ConfigError as e:
            exit_with(e)
        if not config.get("resume"):
            OmegaConf.save(config, sweep_dir / "multirun.yaml")  # what resume= continues (Optuna's sweeper writes none)


def check_sweep_dir(sweep_dir: Path, resume: str | None = None) -> None:
    """Check that a new sweep may start in ``sweep_dir`` (it holds no earlier sweep), or that ``resume``
    continues the sweep in it, and that it is writable. Raises ConfigError: naming the fix."""
    if resume:  # the sweep's own command (sweep_command), into its own dir
        if Path(resume).resolve() != sweep_dir.resolve():
            raise ConfigError(f"resume={resume} continues a sweep through python -m mnist_lab.train -m "
                              f"resume=<sweep dir> alone")
    elif sweep_dir.is_dir() and next(sweep_dir.rglob(".hydra/overrides.yaml"), None) is not None:
        raise ConfigError(f"the sweep dir {sweep_dir} already holds a sweep; give a new hydra.sweep.dir "
                          "(or leave it out for a fresh outputs/sweeps/<date>_<time>), or continue it with "
                          f"python -m mnist_lab.train -m resume={sweep_dir}")
    check_writable(sweep_dir, "sweep dir", "resume=<sweep dir>" if resume else "hydra.sweep.dir=...")


def sweep_command(argv: list[str]) -> list[str]:
    """The command line that continues a sweep: ``-m resume=SWEEP_DIR``, alone, becomes the sweep's own
    command (its ``multirun.yaml``) into its own dir, with ``resume=`` set, and a search goes on with
    :func:`continue_search`'s overrides; any other command line is returned as it is.

    Raises:
        ConfigError: other overrides beside ``resume=``, or not a sweep dir of mnist_lab.train.
    """
    overrides = [a for a in argv[1:] if "=" in a and not a.startswith("-")]
    resume = next((value for key, value, _ in parse_overrides(overrides) if key == "resume"), "None")
    if not {"-m", "--multirun"} & set(argv[1:]) or resume in ("None", "null"):
        return argv
    sweep_dir = Path(resume)
    refuse_others(overrides, sweep_dir)
    if not (sweep_dir / "multirun.yaml").is_file():
        raise ConfigError(f"resume={sweep_dir}: no multirun.yaml there, so it is not a sweep dir of mnist_lab.train "
                          "(those look like outputs/sweeps/<date>_<time>; a run dir resumes without -m)")
    saved = OmegaConf.load(sweep_dir / "multirun.yaml")
    task = [line for key, _, line in parse_overrides(saved.hydra.overrides.task) if key != "resume"]
    extra = [line for key, _, line in parse_overrides(saved.hydra.overrides.hydra)
             if key not in ("hydra.sweep.dir", "hydra.sweeper.n_trials")]
    if OmegaConf.select(saved, "hydra.sweeper.storage"):  # an Optuna search: its study is in the storage
        extra += continue_search(saved.hydra.sweeper)
    print(f"resuming the sweep in {sweep_dir}: {' '.join(task)}", flush=True)
    return [argv[0], "-m", *task, *extra, f"hydra.sweep.dir={sweep_dir}", f"resume={sweep_dir}"]


def continue_search(sweeper: DictConfig) -> list[str]:
    """Ready a killed Optuna search to go on: the trials the kill left running are failed (``Study.tell``)
    and enqueued again (run first, with their parameters), and the finished trials count toward
    ``n_trials``. Returns the override that says so. Resume a search only when none of its workers runs."""
    import optuna  # the optuna extra: only searches need it

    study = optuna.load_study(study_name=sweeper.study_name, storage=sweeper.storage)
    for trial in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.RUNNING]):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(trial.params)
    finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished() and t.state.name != "FAIL"]
    print(f"the search has {len(finished)} finished trials of {sweeper.n_trials}", flush=True)
    return [f"hydra.sweeper.n_trials={max(sweeper.n_trials - len(finished), 0)}"]
