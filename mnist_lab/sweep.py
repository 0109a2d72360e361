"""Sweep summaries: one table and a few plots for a Hydra multirun sweep dir (a job dir per override
set, each with Hydra's ``.hydra/overrides.yaml`` and, once the job ended, its ``metrics.json``).

:func:`write_summary` writes ``summary.csv`` (a row per job: architecture, every override, the
:data:`METRICS`, status, error), ``summary.md`` (jobs grouped over ``seed``: mean ± sample std (n), the
Pareto front, the jobs that did not complete) and the figures (accuracy against parameters and against
FLOPs with the Pareto front, val curves, train−val gap, robustness, and for a two-factor grid a heatmap).
It runs when a multirun ends (:class:`mnist_lab.hydra_callbacks.SweepSummary`) and by hand with
``python scripts/summarize_sweep.py SWEEP_DIR`` (also on a partly failed or unfinished sweep).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections import Counter, defaultdict
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from mnist_lab.plots import plot_acc_vs_params, plot_heatmap, plot_robustness, plot_train_val_gap, plot_val_curves
from mnist_lab.rundir import RunDir, read_epoch_metrics, read_step_metrics, write_text_atomic

#: metrics.json values copied into summary.csv, in this order.
METRICS = ("params_trainable", "test/acc", "test/loss", "test/precision_macro", "test/recall_macro",
           "test/f1_macro", "best_val/loss", "best_val/acc", "last_train/acc", "last_val/acc", "epochs",
           "train_seconds", "test/ece", "robustness/mean", "robustness/rotation_20", "robustness/translation_4",
           "flops_per_image")
_PARSER = OverridesParser.create()


def parse_override(text: str) -> tuple[str, str]:
    """``"+model.batchnorm=True"`` -> ``("model.batchnorm", "true")``: Hydra's parser reads the
    override (its ``+``/``++``/``~`` prefixes dropped); the value is written back the YAML way."""
    override = _PARSER.parse_override(text)
    value = override.value()
    return override.key_or_group, str(value).lower() if isinstance(value, bool) else str(value)


def collect(sweep_dir: str | Path) -> list[dict]:
    """One dict per job dir: ``job``, ``status``, ``factors`` (override -> value, without the keys
    Hydra's ``override_dirname`` excludes, e.g. ``sweep``), the :data:`METRICS`, ``error`` and
    ``history`` (per-epoch metrics from ``metrics.csv``) and ``steps`` (every row by step: the
    validations and the :class:`~mnist_lab.callbacks.Dynamics` records)."""
    sweep_dir = Path(sweep_dir)
    rows = []
    for job in sorted(p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")):  # a '/' in a value nests
        hydra_cfg = OmegaConf.load(job / ".hydra" / "hydra.yaml")
        exclude = set(OmegaConf.select(hydra_cfg, "hydra.job.config.override_dirname.exclude_keys") or [])
        overrides = OmegaConf.load(job / ".hydra" / "overrides.yaml")
        factors = dict(parse_override(o) for o in overrides)
        factors = {k: v for k, v in factors.items() if k not in exclude}
        run = RunDir(job)
        metrics = run.read_metrics() or {"status": "incomplete"}
        rows.append({
            "job": str(job.relative_to(sweep_dir)),
            "status": metrics.get("status", "unknown"),
            "architecture": metrics.get("architecture"),
            "factors": factors,
            **{k: metrics.get(k) for k in METRICS},
            "error": metrics.get("error", "" if metrics.get("status") != "incomplete"
                                 else "no metrics.json: the job was killed or is still running"),
            "history": read_epoch_metrics(run.history),
            "steps": read_step_metrics(run.history),
            "robustness": json.loads(run.robustness.read_text())["accuracy"] if run.robustness.is_file() else {},
        })
    return rows


def config_label(factors: dict[str, str]) -> str:
    """``{"model.batchnorm": "true", "model.dropout": "0.25"}`` -> ``"batchnorm=true, dropout=0.25"``
    (the last part of each key, unless two keys share it)."""
    short = [k.rsplit(".", 1)[-1] for k in factors]
    names = short if len(set(short)) == len(short) else list(factors)
    return ", ".join(f"{n}={v}" for n, v in zip(names, factors.values())) or "(defaults)"


def varying_factors(rows: list[dict], group_out: str = "seed") -> list[str]:
    """Override keys whose value differs between jobs (``group_out`` left out), sorted."""
    keys = sorted({k for r in rows for k in r["factors"]} - {group_out})
    return [k for k in keys if len({r["factors"].get(k) for r in rows}) > 1]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator; 0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(rows: list[dict], group_out: str = "seed") -> list[dict]:
    """Group the completed jobs by every factor but ``group_out`` (the seed).

    Returns one dict per configuration, in first-seen order: ``label`` (the factors that vary
    across the sweep), ``factors``, ``n``, and ``(mean, std)`` pairs for the metrics, for ``gap``
    (last train acc - last val acc) and ``curves`` (per-epoch mean of ``val/acc`` and ``val/loss``).
    """
    varying = varying_factors(rows, group_out)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        if row["status"] == "completed":
            key = tuple((k, v) for k, v in sorted(row["factors"].items()) if k != group_out)
            groups[key].append(row)
    out = []
    for key, members in groups.items():
        factors = dict(key)
        label = config_label({k: v for k, v in factors.items() if k in varying})
        entry = {"label": label, "factors": factors, "n": len(members), "architecture": members[0].get("architecture")}
        for metric in METRICS:
            values = [m[metric] for m in members if m[metric] is not None]
            entry[metric] = mean_std(values) if values else (math.nan, math.nan)
        gaps = [m["last_train/acc"] - m["last_val/acc"] for m in members
                if m["last_train/acc"] is not None and m["last_val/acc"] is not None]
        entry["gap"] = mean_std(gaps) if gaps else (math.nan, math.nan)
        curves = {}
        for metric in ("val/acc", "val/loss"):
            by_epoch = defaultdict(list)
            for m in members:
                for epoch, value in m["history"].get(metric, {}).items():
                    by_epoch[epoch].append(value)
            curves[metric] = {e: statistics.fmean(v) for e, v in sorted(by_epoch.items())}
        entry["curves"] = curves
        robust: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for m in members:
            for kind, res in m.get("robustness", {}).items():
                for strength, acc in res.items():
                    robust[kind][strength].append(acc)
        entry["robustness"] = {k: {st: statistics.fmean(v) for st, v in r.items()} for k, r in robust.items()}
        out.append(entry)
    return out


def pareto_front(groups: list[dict], metric: str = "test/acc", cost: str = "params_trainable") -> list[dict]:
    """The configurations no other beats at the same or a lower ``cost`` (trainable parameters, or
    ``flops_per_image``): sorted by cost, each more accurate (mean ``metric``) than every cheaper one."""
    front, best = [], -math.inf
    for g in sorted(groups, key=lambda g: (g[cost][0], -g[metric][0])):
        if g[metric][0] > best:
            front.append(g)
            best = g[metric][0]
    return front


def _fmt(pair: tuple[float, float], digits: int = 4) -> str:
    mean, std = pair
    return "–" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_summary(sweep_dir: str | Path, title: str | None = None) -> dict:
    """Write ``summary.csv``, ``summary.md`` and the plots into ``sweep_dir``; ``title`` heads the plots
    (None: the sweep dir's name).

    Returns:
        ``{"rows": [...], "groups": [...], "files": [paths written], "failed": [rows not completed]}``.

    Raises:
        FileNotFoundError: ``sweep_dir`` holds no Hydra job dirs.
    """
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    if not rows:
        raise FileNotFoundError(f"no Hydra job dirs (*/.hydra/overrides.yaml) under {sweep_dir}")
    factor_keys = sorted({k for r in rows for k in r["factors"]})
    files = [sweep_dir / "summary.csv", sweep_dir / "summary.md"]
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["job", "status", "architecture", *factor_keys, *METRICS, "error"])
    for r in rows:
        writer.writerow([r["job"], r["status"], r.get("architecture") or "",
                         *(r["factors"].get(k, "") for k in factor_keys),
                         *("" if r[k] is None else r[k] for k in METRICS), r["error"]])
    write_text_atomic(files[0], table.getvalue())
    groups = aggregate(rows)
    write_text_atomic(files[1], "\n".join(_summary_lines(sweep_dir, rows, groups)) + "\n")
    if groups:
        files += _plots(sweep_dir, groups, varying_factors(rows), title or sweep_dir.name)
    return {"rows": rows, "groups": groups, "files": files, "failed": [r for r in rows if r["status"] != "completed"]}


def _summary_lines(sweep_dir: Path, rows: list[dict], groups: list[dict]) -> list[str]:
    """``summary.md``: counts, the table of configurations, the Pareto front, Optuna's best trial, failures."""
    varying = varying_factors(rows)
    fixed = sorted({f"{k}={v}" for r in rows for k, v in r["factors"].items() if k not in varying and k != "seed"})
    statuses = Counter(r["status"] for r in rows)
    counts = ", ".join(f"{statuses.pop(s, 0)} {s}" for s in ("completed", "failed", "incomplete"))
    counts += "".join(f", {n} {s}" for s, n in sorted(statuses.items()))  # diverged, interrupted
    lines = [f"# Sweep summary: {sweep_dir.name}", "",
             f"{len(rows)} jobs: {counts}. "
             "Mean ± sample std over seeds; n = completed seeds. Robust acc: mean test accuracy over the "
             "perturbations of the evaluation suite (rotation, shift, zoom, noise, elastic; strength > 0).", "",
             f"Factors: {', '.join(varying) or '(none)'}. Same for every job: {', '.join(fixed) or '(nothing)'}.", "",
             "| configuration | n | test acc | test macro-F1 | best val acc | robust acc | trainable params "
             "| FLOPs / image | epochs | train s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for g in groups:
        flops = g["flops_per_image"][0]
        lines.append(f"| {g['label']} | {g['n']} | {_fmt(g['test/acc'])} | {_fmt(g['test/f1_macro'])} | "
                     f"{_fmt(g['best_val/acc'])} | {_fmt(g['robustness/mean'])} | {g['params_trainable'][0]:,.0f} | "
                     f"{'–' if math.isnan(flops) else f'{flops:,.0f}'} | {g['epochs'][0]:.1f} | "
                     f"{g['train_seconds'][0]:.1f} |")
    front = pareto_front(groups)
    if len(groups) > 1 and front:
        lines += ["", "Pareto front (no configuration is more accurate with as few trainable parameters): "
                  + "; ".join(f"{g['label']} ({g['params_trainable'][0]:,.0f} params, {_fmt(g['test/acc'])})"
                              for g in front) + "."]
    optuna = sweep_dir / "optimization_results.yaml"  # written by hydra-optuna-sweeper before this runs
    if optuna.is_file():
        best = OmegaConf.load(optuna)
        if "best_params" in best:
            lines += ["", f"Optuna's best trial (objective: best val acc = {best.best_value:.4f}): "
                      + ", ".join(f"{k}={v}" for k, v in best.best_params.items()) + "."]
    failed = [r for r in rows if r["status"] != "completed"]
    if failed:
        lines += ["", "## Jobs that did not complete", "", "| job | status | error |", "| --- | --- | --- |"]
        lines += [f"| {r['job']} | {r['status']} | {r['error'].replace('|', '/').splitlines()[0]} |"
                  for r in failed]
    return lines


def _plots(sweep_dir: Path, groups: list[dict], varying: list[str], title: str) -> list[Path]:
    """The sweep's figures: accuracy against parameters and against FLOPs (where the runs counted them),
    val curves, the train−val gap, robustness and, for a grid of two factors, the heatmap."""
    files = [plot_acc_vs_params(groups, sweep_dir / "acc_vs_params.png", title=title, front=pareto_front(groups))]
    counted = [g for g in groups if not math.isnan(g["flops_per_image"][0])]
    if counted:
        files.append(plot_acc_vs_params(counted, sweep_dir / "acc_vs_flops.png", title=title, x="flops_per_image",
                                        front=pareto_front(counted, cost="flops_per_image")))
    files.append(plot_val_curves(groups, sweep_dir / "val_curves.png", title=title))
    files.append(plot_train_val_gap(groups, sweep_dir / "train_val_gap.png", title=title))
    robust = {g["label"]: g["robustness"] for g in groups if g["robustness"]}
    if robust:
        files.append(plot_robustness(robust, sweep_dir / "robustness.png", title=f"{title}: mean over seeds"))
    if len(varying) == 2:
        files.append(plot_heatmap(groups, varying[0], varying[1], sweep_dir / "heatmap.png", title=title))
    return files
