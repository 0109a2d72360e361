"""Hydra callbacks of ``python -m mnist_lab.train``: before a run or a sweep starts, refuse a dir that
holds an earlier one, or relaunch a sweep that ``-m resume=<sweep dir>`` continues (:class:`RunDirGuard`);
when a sweep ends, write its summary, and a study's report (:class:`SweepSummary`). Both are named under
``hydra.callbacks`` in ``conf/train.yaml``.

Hydra turns an exception in a callback into a warning and exits 0: these exit themselves, with one line.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from mnist_lab.errors import ConfigError, exit_with
from mnist_lab.rundir import RunDir, check_writable
from mnist_lab.study import check_spec, write_report
from mnist_lab.sweep import parse_override, write_summary


class RunDirGuard(Callback):
    """Hydra callback: before Hydra writes anything, refuse (exit code 2, one line) a run dir
    (``hydra.run.dir=...``) that holds an earlier run, a sweep dir that holds an earlier sweep, and
    a dir that cannot be written. ``-m resume=<sweep dir>`` relaunches that sweep's own command (its
    ``multirun.yaml``) into its dir, where each job skips, continues or reruns (``mnist_lab.train.main``)."""

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
            if config.get("resume"):
                if Path(config.resume).resolve() != sweep_dir.resolve():
                    _relaunch(Path(config.resume), config)  # does not return
                check_writable(sweep_dir, "sweep dir", "resume=<sweep dir>")  # the relaunched sweep, in its own dir
                return
            if sweep_dir.is_dir() and next(sweep_dir.rglob(".hydra/overrides.yaml"), None) is not None:
                raise ConfigError(f"the sweep dir {sweep_dir} already holds a sweep; give a new hydra.sweep.dir "
                                  "(or leave it out for a fresh outputs/sweeps/<date>_<time>), or continue it with "
                                  f"python -m mnist_lab.train -m resume={sweep_dir}")
            check_writable(sweep_dir, "sweep dir", "hydra.sweep.dir=...")
        except ConfigError as e:
            exit_with(e)
        OmegaConf.save(config, sweep_dir / "multirun.yaml")  # what resume= relaunches (Optuna's sweeper writes none)


def _relaunch(sweep_dir: Path, config: DictConfig) -> None:
    """Replace this process with the sweep's own command, into its own dir, with ``resume=`` set.

    Raises:
        ConfigError: not a sweep dir of mnist_lab.train, or other overrides beside ``resume=``.
    """
    others = [o for o in config.hydra.overrides.task if parse_override(o)[0] != "resume"]
    if others:
        raise ConfigError(f"resume={sweep_dir} continues the sweep with its own overrides; drop the others "
                          f"({' '.join(others)}), or start a new sweep with them")
    if not (sweep_dir / "multirun.yaml").is_file():
        raise ConfigError(f"resume={sweep_dir}: no multirun.yaml there, so it is not a sweep dir of mnist_lab.train "
                          "(those look like outputs/sweeps/<date>_<time>; a run dir resumes without -m)")
    saved = OmegaConf.load(sweep_dir / "multirun.yaml")
    task = [o for o in saved.hydra.overrides.task if parse_override(o)[0] != "resume"]
    search = ["hydra.sweeper.n_trials", "hydra.sweeper.sampler.seed"]
    extra = [o for o in saved.hydra.overrides.hydra if parse_override(o)[0] not in ("hydra.sweep.dir", *search)]
    saved.hydra.sweep.dir = str(sweep_dir)
    if OmegaConf.select(saved, "hydra.sweeper.storage"):  # an Optuna search: its study is in the storage
        extra += _continue_search(saved.hydra.sweeper)
    print(f"resuming the sweep in {sweep_dir}: {' '.join(task)}", flush=True)
    os.execv(sys.executable, [sys.executable, "-m", "mnist_lab.train", "-m", *task, *extra,
                              f"hydra.sweep.dir={sweep_dir}", f"resume={sweep_dir}"])


def _continue_search(sweeper: DictConfig) -> list[str]:
    """Ready a killed Optuna search to go on: the trials the kill left running are failed and enqueued
    again (run first, with their parameters), the finished trials count toward ``n_trials``, and the
    sampler's seed moves on (a seeded sampler would propose its first trials again). Returns the
    overrides that say so. Resume a search only when none of its workers is running."""
    import optuna  # the optuna extra: only searches need it

    study = optuna.load_study(study_name=sweeper.study_name, storage=sweeper.storage)
    for trial in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.RUNNING]):
        study._storage.set_trial_state(trial._trial_id, optuna.trial.TrialState.FAIL)
        study.enqueue_trial(trial.params)
    finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished() and t.state.name != "FAIL"]
    print(f"the search has {len(finished)} finished trials of {sweeper.n_trials}", flush=True)
    seed = OmegaConf.select(sweeper, "sampler.seed")
    return [f"hydra.sweeper.n_trials={max(sweeper.n_trials - len(finished), 0)}",
            *([f"hydra.sweeper.sampler.seed={seed + len(study.trials)}"] if seed is not None else [])]


class SweepSummary(Callback):
    """Hydra callback (``hydra.callbacks.sweep_summary`` in ``conf/train.yaml``): writes the summary
    (and, for a study, its ``report.md``: :mod:`mnist_lab.study`) when a multirun ends, and exits with
    code 1 if any job failed (after writing them)."""

    def on_multirun_start(self, config, **kwargs) -> None:
        if config.get("study") is not None:
            keys = {parse_override(o)[0] for o in config.hydra.overrides.task}
            keys |= {k.lstrip("+~") for k in (OmegaConf.select(config, "hydra.sweeper.params") or {})}
            try:
                check_spec(OmegaConf.to_container(config.study, resolve=True), keys)
            except ConfigError as e:
                print(f"error: {e}", file=sys.stderr)
                sys.exit(1)

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir, study = Path(config.hydra.sweep.dir), config.get("study")
        try:
            result = write_summary(sweep_dir, title=f"study: {study.name}" if study is not None else None)
            print(f"sweep dir: {sweep_dir}")
            print(f"summary: {sweep_dir / 'summary.md'} ({len(result['rows'])} jobs)")
            if study is not None:
                report = write_report(sweep_dir, OmegaConf.to_container(study, resolve=True), result["rows"])
                print(f"report: {report}")
        except Exception as e:  # noqa: BLE001 - reported, and the exit code says it
            print(f"error: the sweep summary of {sweep_dir} failed: {type(e).__name__}: {e}", file=sys.stderr)
            sys.exit(1)
        if result["failed"]:
            print(f"{len(result['failed'])} of {len(result['rows'])} jobs did not complete; "
                  "their errors are in summary.md", file=sys.stderr)
            sys.exit(1)
