"""Sweeps: ``summary.csv``, ``summary.md`` and the figures of a Hydra multirun sweep dir
(:func:`write_summary`), and :class:`SweepCallback`, the Hydra callback of every multirun.
"""

import contextlib
import multiprocessing
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from mnist_lab.config import parse_overrides
from mnist_lab.errors import ConfigError, RunInterrupted, exit_with
from mnist_lab.plots import plot_acc_vs_params, plot_heatmap, plot_robustness, plot_train_val_gap, plot_val_curves
from mnist_lab.results import Job, aggregate, collect, factors, fixed, markdown, matches, pareto_front
from mnist_lab.rundir import sweep_root, write_text_atomic
from mnist_lab.study import check_spec, spec_of, values_of, write_report

#: summary.md's columns: value -> header.
COLUMNS = {"test/acc": "test acc", "test/f1_macro": "test macro-F1", "best_val/acc": "best val acc",
           "robustness/mean": "robust acc", "params_trainable": "trainable params", "flops_per_image": "FLOPs / image",
           "epochs": "epochs", "train_seconds": "train s"}


def write_summary(sweep_dir: str | Path, title: str | None = None, table: pd.DataFrame | None = None) -> dict:
    """Write ``summary.csv``, ``summary.md`` and the plots into ``sweep_dir``; ``table``: its jobs (None:
    :func:`~mnist_lab.results.collect` them); ``title`` heads the plots (None: the sweep dir's name).

    Returns:
        ``{"table", "groups", "files": [paths written], "failed": [jobs not completed]}``.

    Raises:
        FileNotFoundError: ``sweep_dir`` holds no Hydra job dirs.
    """
    sweep_dir = Path(sweep_dir)
    table = collect(sweep_dir) if table is None else table
    if table.empty:
        raise FileNotFoundError(f"no Hydra job dirs (*/.hydra/overrides.yaml) under {sweep_dir}")
    files = [sweep_dir / "summary.csv", sweep_dir / "summary.md"]
    write_text_atomic(files[0], table.to_csv(index=False, lineterminator="\r\n"))  # as the csv module writes
    groups = aggregate(table)
    write_text_atomic(files[1], "\n".join(_summary_lines(sweep_dir, table, groups)) + "\n")
    if len(groups):
        files += _plots(sweep_dir, table, groups, title or sweep_dir.name)
    failed = table[table["status"] != "completed"]
    return {"table": table, "groups": groups, "files": files, "failed": failed["job"].tolist()}


def _pair(group: pd.Series, value: str) -> str:
    return "–" if pd.isna(group[value]) else f"{group[value]:.4f} ± {group[f'{value} std']:.4f}"


def _summary_lines(sweep_dir: Path, table: pd.DataFrame, groups: pd.DataFrame) -> list[str]:
    """``summary.md``: counts, the table of configurations, the Pareto front, Optuna's best trial, failures."""
    statuses = table["status"].value_counts().to_dict()
    counts = ", ".join(f"{statuses.pop(s, 0)} {s}" for s in ("completed", "failed", "incomplete"))
    counts += "".join(f", {n} {s}" for s, n in sorted(statuses.items()))  # diverged, interrupted
    lines = [f"# Sweep summary: {sweep_dir.name}", "",
             f"{len(table)} jobs: {counts}. "
             "Mean ± sample std over seeds; n = completed seeds. Robust acc: mean test accuracy over the "
             "perturbations of the evaluation suite (rotation, shift, zoom, noise, elastic; strength > 0).", "",
             f"Factors: {', '.join(factors(table)) or '(none)'}. Same for every job: "
             f"{', '.join(fixed(table)) or '(nothing)'}.", "",
             *markdown(["configuration", "n", *COLUMNS.values()], [
                 [g["label"], g["n"], *(_pair(g, v) for v in list(COLUMNS)[:4]), f"{g['params_trainable']:,.0f}",
                  "–" if pd.isna(g["flops_per_image"]) else f"{g['flops_per_image']:,.0f}", f"{g['epochs']:.1f}",
                  f"{g['train_seconds']:.1f}"] for _, g in groups.iterrows()], "l" + "r" * 9)]
    front = pareto_front(groups) if len(groups) > 1 else groups.iloc[:0]
    if len(front):
        lines += ["", "Pareto front (no configuration is more accurate with as few trainable parameters): "
                  + "; ".join(f"{g['label']} ({g['params_trainable']:,.0f} params, {_pair(g, 'test/acc')})"
                              for _, g in front.iterrows()) + "."]
    optuna = sweep_dir / "optimization_results.yaml"  # written by hydra-optuna-sweeper before this runs
    if optuna.is_file() and "best_params" in (best := OmegaConf.load(optuna)):
        lines += ["", f"Optuna's best trial (objective: best val acc = {best.best_value:.4f}): "
                  + ", ".join(f"{k}={v}" for k, v in best.best_params.items()) + "."]
    failed = table[table["status"] != "completed"]
    if len(failed):
        lines += ["", "## Jobs that did not complete", "", *markdown(["job", "status", "error"], [
            [r.job, r.status, str(r.error).replace("|", "/").splitlines()[0] if r.error else ""]
            for r in failed.itertuples()], "lll")]
    return lines


def _plots(sweep_dir: Path, table: pd.DataFrame, groups: pd.DataFrame, title: str) -> list[Path]:
    """The sweep's figures: accuracy against parameters and against FLOPs (where the runs counted them),
    the train−val gap, for a grid of two factors the heatmap, and from the job dirs (where they are) the
    val curves and robustness, means over seeds."""
    tested = groups.dropna(subset=["test/acc"])  # none: a study's nuisance trials
    files = [plot_acc_vs_params(tested, sweep_dir / "acc_vs_params.png", title=title, front=pareto_front(tested))
             ] if len(tested) else []
    counted = tested.dropna(subset=["flops_per_image"])
    if len(counted):
        files.append(plot_acc_vs_params(counted, sweep_dir / "acc_vs_flops.png", title=title, x="flops_per_image",
                                        front=pareto_front(counted, cost="flops_per_image")))
    files.append(plot_train_val_gap(groups, sweep_dir / "train_val_gap.png", title=title))
    varying = factors(table)
    if len(varying) == 2 and len(tested):
        files.append(plot_heatmap(groups, varying[0], varying[1], sweep_dir / "heatmap.png", title=title))
    done = table[(table["status"] == "completed") & table["job"].map(lambda j: (sweep_dir / j).is_dir())]
    jobs = {g["label"]: [Job.read(sweep_dir / j) for j in done.loc[matches(done, g[varying].to_dict()), "job"]]
            for _, g in groups.iterrows()}
    curves = {name: pd.concat([j.epochs[[c for c in ("val/acc", "val/loss") if c in j.epochs]] for j in members])
              .groupby(level=0).mean() for name, members in jobs.items() if members}
    if curves:
        files.append(plot_val_curves(curves, sweep_dir / "val_curves.png", title=title))
    robust = {name: {kind: {s: statistics.fmean(j.robustness[kind][s] for j in members) for s in strengths}
                     for kind, strengths in members[0].robustness.items()}
              for name, members in jobs.items() if members and members[0].robustness}
    if robust:
        files.append(plot_robustness(robust, sweep_dir / "robustness.png", title=f"{title}: mean over seeds"))
    return files


class SweepCallback(Callback):
    """Hydra callback of every multirun: a study's spec is checked before the first job (one line, exit
    code 1); with jobs in worker processes (``+launcher=cpu_parallel``) a SIGTERM stops the workers too
    (:func:`_stop_workers`) and the sweep exits 143 with its resume command; when the sweep ends,
    the summary (and a study's ``report.md``) is written, and the exit code is 1 if a job failed."""

    def on_multirun_start(self, config, **kwargs) -> None:
        if config.get("study") is not None:
            keys = {key for key, _, _ in parse_overrides(config.hydra.overrides.task)}
            keys |= {k.lstrip("+~") for k in (OmegaConf.select(config, "hydra.sweeper.params") or {})}
            try:
                check_spec(spec_of(config), keys)
            except ConfigError as e:
                print(f"error: {e}", file=sys.stderr)
                sys.exit(1)
        if "joblib" in str(OmegaConf.select(config, "hydra.launcher._target_")):
            sweep_dir = config.hydra.sweep.dir
            signal.signal(signal.SIGTERM, lambda signum, frame: _stop_workers(sweep_dir))

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        spec = spec_of(config) if config.get("test", True) else None  # a study's nuisance trials: no report
        try:
            result = write_summary(sweep_dir, title=f"study: {spec['name']}" if spec else None,
                                   table=collect(sweep_dir, values_of(spec) if spec else ()))
            print(f"sweep dir: {sweep_dir}")
            print(f"summary: {sweep_dir / 'summary.md'} ({len(result['table'])} jobs)")
            if spec:
                print(f"report: {write_report(sweep_dir, spec, result['table'])}")
        except Exception as e:  # noqa: BLE001 - reported, and the exit code says it
            print(f"error: the sweep summary of {sweep_dir} failed: {type(e).__name__}: {e}", file=sys.stderr)
            sys.exit(1)
        if result["failed"]:
            print(f"{len(result['failed'])} of {len(result['table'])} jobs did not complete; "
                  "their errors are in summary.md", file=sys.stderr)
            sys.exit(1)


def _stop_workers(sweep_dir: str) -> None:
    """SIGTERM to every worker process; once each running job has recorded itself interrupted (a minute at
    most), SIGKILL to the workers, which would otherwise wait for more jobs; then exit 143 with the command
    that resumes the sweep."""
    workers = multiprocessing.active_children()
    for worker in workers:
        os.kill(worker.pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(
            not (run.parent / "metrics.json").is_file() for run in Path(sweep_dir).rglob("config.yaml")
            if run.parent.name != ".hydra"):
        time.sleep(0.2)
    for worker in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGKILL)
    exit_with(RunInterrupted(f"stopped by SIGTERM; continue with: python -m mnist_lab.train -m resume="
                             f"{sweep_root(Path(sweep_dir))}",
                             "SIGTERM"))
