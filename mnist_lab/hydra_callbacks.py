"""Hydra callbacks of ``python -m mnist_lab.train``: before a run or a sweep starts, refuse a dir that
holds an earlier one (:class:`RunDirGuard`); when a sweep ends, write its summary, and a study's report
(:class:`SweepSummary`). Both are named under ``hydra.callbacks`` in ``conf/train.yaml``.

Hydra turns an exception in a callback into a warning and exits 0: these exit themselves, with one line.
"""

from __future__ import annotations

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


class SweepSummary(Callback):
    """Hydra callback (``hydra.callbacks.sweep_summary`` in ``conf/train.yaml``): writes the summary
    (and, for a study, its ``report.md``: :mod:`mnist_lab.study`) when a multirun ends, and exits with
    code 1 if any job failed (after writing them)."""

    # Hydra turns an exception in a callback into a warning and exits 0: errors exit here, with code 1.

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
