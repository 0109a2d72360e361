"""Per-job values, each computed once here (a new value is one entry of :data:`VALUES` or :data:`PATTERNS`),
and the table of a sweep's jobs (``summary.csv``) grouped into its configurations (pandas).
"""

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import pandas as pd
from omegaconf import OmegaConf

from mnist_lab.config import parse_overrides
from mnist_lab.rundir import RunDir, column, group_history, read_history

#: ``metrics.json`` figures a job's row carries, in this order.
METRICS = ("params_trainable", "test/acc", "test/loss", "test/precision_macro", "test/recall_macro",
           "test/f1_macro", "best_val/loss", "best_val/acc", "last_train/acc", "last_val/acc", "epochs",
           "train_seconds", "test/ece", "robustness/mean", "robustness/rotation_20", "robustness/translation_4",
           "flops_per_image")
META = ("job", "status", "architecture", "error")


class Job(NamedTuple):
    """One run's figures: ``metrics`` (``metrics.json``), its history per epoch and per optimizer step
    (:func:`~mnist_lab.rundir.group_history`) and ``robustness`` (``{kind: {strength: accuracy}}``)."""

    metrics: Mapping
    epochs: pd.DataFrame
    steps: pd.DataFrame
    robustness: dict

    @classmethod
    def read(cls, run_dir: str | Path) -> "Job":
        run, history = RunDir(run_dir), read_history(Path(run_dir) / "metrics.csv")
        robustness = json.loads(run.robustness.read_text())["accuracy"] if run.robustness.is_file() else {}
        return cls(run.read_metrics(), group_history(history, "epoch"), group_history(history, "step"), robustness)

    @classmethod
    def from_row(cls, row: Mapping) -> "Job":
        """A job known by its ``summary.csv`` row alone: the values of its history are None."""
        return cls({k: None if v != v else v for k, v in row.items()}, pd.DataFrame(), pd.DataFrame(), {})


def _minus(a, b) -> float | None:
    return None if a is None or b is None else float(a - b)


def _auc(curve: pd.Series) -> float | None:
    steps, v = curve.index.to_numpy(), curve.to_numpy()
    return float(((steps[1:] - steps[:-1]) * (v[1:] + v[:-1]) / 2).sum() / (steps[-1] - steps[0])) \
        if len(v) > 1 else None


def _layer(job: Job, which: int) -> float | None:
    """The mean update ratio of the network's first (0) or last (-1) parameterised layer, in module order."""
    layers = sorted((c for c in job.steps if c.startswith("update_ratio/")),
                    key=lambda c: [int(p) if p.isdigit() else p for p in c.split("/", 1)[1].split(".")])
    return float(column(job.steps, layers[which]).mean()) if layers else None


def _first(series: pd.Series, acc: str) -> int | None:
    reached = series >= float(acc)
    return int(reached.idxmax()) + 1 if reached.any() else None


def _grad_norms(job: Job) -> pd.Series:
    return column(job.steps, "dynamics/grad_norm")


#: Derived per-job values (docs/studies/README.md says each), each a function of a :class:`Job`.
VALUES = {name: (lambda job, name=name: job.metrics.get(name)) for name in METRICS} | {
    # last-epoch top-1 accuracy on the training batches (dropout, augmentation on) minus val accuracy
    "gap": lambda job: _minus(job.metrics.get("last_train/acc"), job.metrics.get("last_val/acc")),
    "val_loss_epoch1": lambda job: column(job.epochs, "val/loss").get(0),
    # the area under the val loss against optimizer steps (trapezoids) over the steps it spans
    "val_loss_auc": lambda job: _auc(column(job.steps, "val/loss")),
    "max_grad_norm": lambda job: _grad_norms(job).max() if len(_grad_norms(job)) else None,
    # the mean global gradient norm of the last 10 % of the dynamics records
    "final_grad_norm": lambda job: _grad_norms(job).iloc[-max(1, len(_grad_norms(job)) // 10):].mean()
    if len(_grad_norms(job)) else None,
    "update_ratio_first": lambda job: _layer(job, 0),
    "update_ratio_last": lambda job: _layer(job, -1),
}
#: Values with a parameter: optimizer steps, or epochs, until the first validation at or above an accuracy
#: (1-based; None: not reached), the train − val gap after epoch n, any point of ``robustness.json``.
PATTERNS = {
    re.compile(r"steps_to_val_acc_([\d.]+)"): lambda job, acc: _first(column(job.steps, "val/acc"), acc),
    re.compile(r"epochs_to_val_acc_([\d.]+)"): lambda job, acc: _first(column(job.epochs, "val/acc"), acc),
    re.compile(r"gap_epoch_(\d+)"): lambda job, n: _minus(*(column(job.epochs, k).get(int(n) - 1)
                                                             for k in ("train/acc", "val/acc"))),
    re.compile(r"robustness/([a-z]+)_([\d.]+)"): lambda job, kind, strength: job.robustness.get(kind, {}).get(
        strength, job.metrics.get(f"robustness/{kind}_{strength}")),
}


def is_value(name: str) -> bool:
    """Whether ``name`` names a per-job value."""
    return name in VALUES or any(p.fullmatch(name) for p in PATTERNS)


def job_value(job: Job, name: str) -> float | None:
    """One job's value of ``name``, or None. Raises KeyError: ``name`` is not a value."""
    found = VALUES[name](job) if name in VALUES else next(
        (fn(job, *p.fullmatch(name).groups()) for p, fn in PATTERNS.items() if p.fullmatch(name)), KeyError)
    if found is KeyError:
        raise KeyError(name)
    return None if found is None or found != found else found


def collect(sweep_dir: str | Path, names: Sequence[str] = ()) -> pd.DataFrame:
    """The table of a sweep's jobs (``summary.csv``): a row per job dir (one with Hydra's
    ``.hydra/overrides.yaml``), columns ``job``, ``status``, ``architecture``, one per override (its value
    as YAML writes it; the keys Hydra's ``override_dirname`` excludes, e.g. ``sweep``, left out; the jobs of a
    sweep dir inside it, a study's nuisance trials, left out too), every
    value of :data:`VALUES` and ``names``, and ``error``. Values keep their JSON types (object columns)."""
    sweep_dir, rows, names = Path(sweep_dir), [], list(dict.fromkeys([*VALUES, *names]))
    for job in sorted(p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")):  # a '/' in a value nests
        if (sweep_dir / job.relative_to(sweep_dir).parts[0] / "multirun.yaml").is_file():
            continue  # a sweep of its own inside this one: a study's nuisance trials
        excluded = OmegaConf.select(OmegaConf.load(job / ".hydra" / "hydra.yaml"),
                                    "hydra.job.config.override_dirname.exclude_keys") or []
        read = Job.read(job)
        rows.append({"job": str(job.relative_to(sweep_dir)),
                     "status": read.metrics.get("status", "unknown") if read.metrics else "incomplete",
                     "architecture": read.metrics.get("architecture"),
                     **{k: v for k, v, _ in parse_overrides(OmegaConf.load(job / ".hydra" / "overrides.yaml"))
                        if k not in excluded}, **{n: job_value(read, n) for n in names},
                     "error": read.metrics.get("error", "") if read.metrics else
                     "no metrics.json: the job was killed or is still running"})
    keys = sorted({k for r in rows for k in r} - {*META, *names})
    return pd.DataFrame(rows, columns=[*META[:3], *keys, *names, "error"], dtype=object)


def read_summary(path: str | Path) -> pd.DataFrame:
    """A ``summary.csv`` back as the table :func:`collect` made: overrides as text, values as numbers."""
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    return table.apply(lambda c: pd.to_numeric(c.replace("", None)) if is_value(c.name) else c)


def overrides(table: pd.DataFrame) -> list[str]:
    """The override columns of a jobs table (neither values nor job, status, architecture, error)."""
    return [c for c in table if c not in META and not is_value(c)]


def factors(table: pd.DataFrame, group_out: str = "seed") -> list[str]:
    """The override columns whose value differs between jobs (``group_out`` left out)."""
    return [k for k in overrides(table) if k != group_out and table[k].fillna("").nunique() > 1]


def fixed(table: pd.DataFrame) -> list[str]:
    """The overrides every job shares but the seed, as ``key=value``, sorted."""
    varying = factors(table)
    return sorted({f"{k}={v}" for k in overrides(table) if k not in (*varying, "seed")
                   for v in table[k].dropna().astype(str) if v})


def as_yaml(value) -> str:
    """A value as an override's text: ``True`` -> ``"true"``."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def matches(jobs: pd.DataFrame, selector: Mapping) -> pd.Series:
    """Per job, whether its overrides hold every ``key: value`` of ``selector`` (as YAML writes it)."""
    keep = pd.Series(True, index=jobs.index)
    for k, v in selector.items():
        keep &= jobs[k].fillna("").astype(str).eq(as_yaml(v)) if k in jobs else False
    return keep


def config_label(factors: Mapping[str, str]) -> str:
    """``{"model.batchnorm": "true", "model.dropout": "0.25"}`` -> ``"batchnorm=true, dropout=0.25"``
    (the last part of each key, unless two keys share it)."""
    short = [k.rsplit(".", 1)[-1] for k in factors]
    names = short if len(set(short)) == len(short) else list(factors)
    return ", ".join(f"{n}={v}" for n, v in zip(names, factors.values())) or "(defaults)"


def aggregate(table: pd.DataFrame, group_out: str = "seed") -> pd.DataFrame:
    """The completed jobs grouped by every override but ``group_out`` (the seed), in first-seen order: a row
    per configuration with ``label`` (the overrides that vary across the sweep), ``n`` (completed jobs),
    ``architecture``, the overrides, and per value ``v``: its mean ``v``, sample standard deviation
    ``"v std"`` (n - 1 in the denominator; 0 for one value) and count ``"v n"`` (jobs with a value)."""
    done, keys = table[table["status"] == "completed"], [c for c in overrides(table) if c != group_out]
    if done.empty:
        return pd.DataFrame(columns=["label", "n", "architecture", *keys])
    by = [done[k].fillna("").astype(str) for k in keys] or [pd.Series("", index=done.index, name="all")]
    values = done[[c for c in table if is_value(c)]].apply(pd.to_numeric)
    stats = values.groupby(by, sort=False).agg(["mean", "std", "count"])
    stats.columns = [v if s == "mean" else f"{v} {'n' if s == 'count' else s}" for v, s in stats.columns]
    for v in values:  # one value: no spread
        stats[f"{v} std"] = stats[f"{v} std"].mask(stats[f"{v} n"] == 1, 0.0)
    meta = done.groupby(by, sort=False).agg(n=("status", "size"), architecture=("architecture", "first"))
    groups = pd.concat([meta, stats], axis=1).reset_index().drop(columns="all", errors="ignore")
    varying = factors(table, group_out)
    groups.insert(0, "label", [config_label({k: r[k] for k in varying if r[k] != ""}) for _, r in groups.iterrows()])
    return groups


def pareto_front(groups: pd.DataFrame, metric: str = "test/acc", cost: str = "params_trainable") -> pd.DataFrame:
    """The configurations no other beats at the same or a lower ``cost`` (trainable parameters, or
    ``flops_per_image``): sorted by cost, each more accurate (mean ``metric``) than every cheaper one."""
    ranked = groups.sort_values([cost, metric], ascending=[True, False], kind="stable")
    return ranked[ranked[metric] > ranked[metric].cummax().shift(fill_value=-float("inf"))]


def markdown(header: Sequence[str], rows, align: str) -> list[str]:
    """A markdown table's lines: ``header``, the alignment row (one of ``l``, ``r``, ``c`` per column) and
    ``rows`` (sequences of cells)."""
    marks = {"l": " --- |", "r": " ---: |", "c": " :---: |"}
    return ["| " + " | ".join(header) + " |", "|" + "".join(marks[a] for a in align),
            *("| " + " | ".join(map(str, row)) + " |" for row in rows)]
