"""Studies: a sweep that answers one research question, with a ``report.md`` beside its summary.

A study is a named sweep config, ``conf/study/<name>.yaml``, run with ``python -m mnist_lab.train
+study=<name>``, whose ``study`` node (question, protocol, cut, columns, plots, comparisons; every key is
in docs/studies/README.md) every job saves in its ``.hydra/config.yaml``. Per-job values are
:data:`VALUES` and any point of ``robustness.json``; comparisons are Welch's t-test (two configurations)
or the one-sample t-test (against a published figure) with 95 % confidence intervals (scipy.stats).
:func:`write_report` runs when a study's multirun ends and by hand with ``scripts/summarize_sweep.py``.
"""

from __future__ import annotations

import math
import re
import statistics
import warnings
from pathlib import Path

from omegaconf import OmegaConf

from mnist_lab.errors import ConfigError
from mnist_lab.plots import plot_run_curves
from mnist_lab.rundir import write_text_atomic
from mnist_lab.sweep import METRICS, collect, config_label, varying_factors

#: Names of the per-job values in the report's prose and table headers.
LABELS = {
    "test/acc": "test acc", "test/f1_macro": "test macro-F1", "test/loss": "test loss", "test/ece": "test ECE",
    "best_val/acc": "best val acc", "best_val/loss": "best val loss", "params_trainable": "trainable params",
    "train_seconds": "train s", "epochs": "epochs", "gap": "train−val gap", "flops_per_image": "FLOPs / image",
    "robustness/mean": "robust acc (mean)", "robustness/rotation_20": "acc, rotated 20°",
    "robustness/translation_4": "acc, shifted 4 px", "val_loss_epoch1": "val loss after epoch 1",
    "epochs_to_threshold": "epochs to val acc ≥ {threshold}", "val_loss_auc": "val loss, mean over steps",
    "max_grad_norm": "largest grad norm", "final_grad_norm": "grad norm, last 10 % of steps",
    "update_ratio_first": "update ratio, first layer", "update_ratio_last": "update ratio, last layer",
}
ALPHA = 0.05
#: Per-job values a study can tabulate and compare, besides any point of ``robustness.json``
#: (``robustness/noise_0.3``: accuracy under Gaussian noise of std 0.3). docs/studies/README.md says each.
VALUES = (*METRICS, "gap", "val_loss_epoch1", "epochs_to_threshold", "val_loss_auc", "max_grad_norm",
          "final_grad_norm", "update_ratio_first", "update_ratio_last")
ROBUST = re.compile(r"robustness/([a-z]+)_([\d.]+)")
#: per-job values with a parameter: ``steps_to_val_acc_0.99`` (optimizer steps until the first validation
#: at or above 99 %), ``gap_epoch_3`` (train − val top-1 accuracy after epoch 3)
STEPS_TO = re.compile(r"steps_to_val_acc_([\d.]+)")
GAP_AT = re.compile(r"gap_epoch_(\d+)")


def check_spec(spec: dict, factors: set[str]) -> None:
    """Check a ``study`` node (a dict) before its sweep starts; ``factors``: the keys the sweep varies or
    sets (``model.depth``, ``aug``, ``seed``, ...; no ``+``).

    Raises:
        ConfigError: a missing ``name`` / ``question`` / ``columns``, a metric that is not a per-job value
            (:data:`VALUES`), a ``names`` entry or comparison selecting on a key the sweep does not set, or
            a comparison with neither ``b`` nor ``published``.
    """
    where = f"study {spec.get('name', '?')}"
    for key in ("name", "question", "columns"):
        if not spec.get(key):
            raise ConfigError(f"{where}: study.{key} is missing; every study needs name, question and columns")
    for metric in [*spec["columns"], *(c.get("metric") for c in spec.get("comparisons", []))]:
        if metric not in VALUES and not any(r.fullmatch(str(metric)) for r in (ROBUST, STEPS_TO, GAP_AT)):
            raise ConfigError(f"{where}: unknown value {metric!r}; use one of {', '.join(VALUES)}, "
                              "robustness/<kind>_<strength> (e.g. robustness/noise_0.3), steps_to_val_acc_<acc> "
                              "or gap_epoch_<n>")
    for entry in spec.get("names", []):
        for key in set(entry["when"]) - factors:
            raise ConfigError(f"{where}: study.names entry {entry['name']!r} selects on {key!r}, which the sweep "
                              f"does not set; use one of {', '.join(sorted(factors))}")
    for c in spec.get("comparisons", []):
        if ("b" in c) == ("published" in c):
            raise ConfigError(f"{where}: comparison {c} needs either b (a configuration) or published (a number)")
        for key in {*c["a"], *c.get("b", {})} - factors:
            raise ConfigError(f"{where}: comparison {c} selects on {key!r}, which the sweep does not set; "
                              f"use one of {', '.join(sorted(factors))}")


def study_spec(sweep_dir: str | Path) -> dict | None:
    """The ``study`` node of the first job's saved ``.hydra/config.yaml``; None for a plain sweep."""
    for cfg_file in sorted(Path(sweep_dir).rglob(".hydra/config.yaml")):
        cfg = OmegaConf.load(cfg_file)
        if "study" in cfg and cfg.study is not None:
            return OmegaConf.to_container(cfg.study, resolve=True)
    return None


def job_value(row: dict, metric: str, threshold: float = 0.99) -> float | None:
    """One job's value of ``metric`` (:data:`VALUES`, ``robustness/<kind>_<strength>``), or None."""
    history = row["history"]
    if metric == "gap":
        train, val = row["last_train/acc"], row["last_val/acc"]
        return None if train is None or val is None else train - val
    if metric == "val_loss_epoch1":
        return history.get("val/loss", {}).get(0)
    if metric == "epochs_to_threshold":
        reached = [epoch for epoch, acc in history.get("val/acc", {}).items() if acc >= threshold]
        return min(reached) + 1 if reached else None
    steps = row.get("steps", {})
    if STEPS_TO.fullmatch(metric):
        t = float(STEPS_TO.fullmatch(metric).group(1))
        reached = [step for step, acc in steps.get("val/acc", {}).items() if acc >= t]
        return min(reached) + 1 if reached else None
    if GAP_AT.fullmatch(metric):
        epoch = int(GAP_AT.fullmatch(metric).group(1)) - 1
        train, val = history.get("train/acc", {}).get(epoch), history.get("val/acc", {}).get(epoch)
        return None if train is None or val is None else train - val
    if metric == "val_loss_auc":  # trapezoids over the validations, divided by the steps they span
        curve = sorted(steps.get("val/loss", {}).items())
        if len(curve) < 2:
            return None
        area = sum((s1 - s0) * (v0 + v1) / 2 for (s0, v0), (s1, v1) in zip(curve, curve[1:]))
        return area / (curve[-1][0] - curve[0][0])
    if metric in ("max_grad_norm", "final_grad_norm"):
        norms = [v for _, v in sorted(steps.get("dynamics/grad_norm", {}).items())]
        if not norms:
            return None
        return max(norms) if metric == "max_grad_norm" else statistics.fmean(norms[-max(1, len(norms) // 10):])
    if metric in ("update_ratio_first", "update_ratio_last"):  # layers in the network's order (module names)
        layers = sorted((k for k in steps if k.startswith("update_ratio/")),
                        key=lambda k: [int(p) if p.isdigit() else p for p in k.split("/", 1)[1].split(".")])
        if not layers:
            return None
        return statistics.fmean(steps[layers[0 if metric == "update_ratio_first" else -1]].values())
    if row.get(metric) is None and ROBUST.fullmatch(metric):  # any point of robustness.json
        kind, strength = ROBUST.fullmatch(metric).groups()
        return row["robustness"].get(kind, {}).get(strength)
    return row.get(metric)


def matches(factors: dict[str, str], selector: dict) -> bool:
    """Whether a job's overrides hold every ``factor: value`` of ``selector`` (as YAML text: ``"true"``)."""
    return all(factors.get(k) == (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in selector.items())


def compare(a: list[float], b: list[float] | None = None, published: float | None = None) -> dict:
    """Difference of means, its 95 % confidence interval and a two-sided t-test: ``mean(a) − mean(b)``
    with Welch's t-test (unequal variances), or ``mean(a) − published`` with the one-sample t-test.

    Returns:
        ``{"diff", "low", "high", "t", "df", "p", "n_a", "n_b", "significant"}``; ``t``, ``p``, ``low``,
        ``high`` NaN (not significant) when there is no test: fewer than 2 values in a group, no spread.
    """
    from scipy import stats  # imported here: only reports need it
    with warnings.catch_warnings():  # identical values: scipy warns and returns NaN, reported as "no test"
        warnings.simplefilter("ignore", RuntimeWarning)
        if b is None:  # the one-sample interval is of mean(a); shifted, of mean(a) - published
            diff, shift = statistics.fmean(a) - published, published
            result = stats.ttest_1samp(a, published) if len(a) > 1 else None
        else:
            diff, shift = statistics.fmean(a) - statistics.fmean(b), 0.0
            result = stats.ttest_ind(a, b, equal_var=False) if len(a) > 1 and len(b) > 1 else None
        ci = result.confidence_interval(1 - ALPHA) if result is not None else None
        low, high = (ci.low - shift, ci.high - shift) if ci is not None else (math.nan, math.nan)
    t, p, df = (float(result.statistic), float(result.pvalue), float(result.df)) if result else (math.nan,) * 3
    if not math.isfinite(t):  # no spread (t = ±inf or 0/0): no test rather than a p of 0
        t = p = low = high = math.nan
    return {"diff": diff, "low": float(low), "high": float(high), "t": t, "df": df, "p": p,
            "n_a": len(a), "n_b": len(b) if b is not None else 0, "significant": bool(p < ALPHA)}


def _fmt(metric: str, value: float) -> str:
    if metric in ("params_trainable", "flops_per_image"):
        return f"{value:,.0f}"
    if metric.startswith("update_ratio"):
        return f"{value:.2e}"
    if metric in ("train_seconds", "epochs", "epochs_to_threshold") or STEPS_TO.fullmatch(metric):
        return f"{value:.1f}"
    return f"{value:.4f}"


def _signed(metric: str, value: float) -> str:
    return "–" if math.isnan(value) else ("+" if value >= 0 else "-") + _fmt(metric, abs(value))


def _cell(metric: str, values: list[float], n_jobs: int) -> str:
    counted = metric == "epochs_to_threshold" or STEPS_TO.fullmatch(metric)  # "not reached" is no value
    if not values:
        return f"–, 0/{n_jobs} reached" if counted else "–"
    mean, std = statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0
    if metric in ("params_trainable", "flops_per_image"):  # the same for every seed
        return _fmt(metric, mean)
    cell = f"{_fmt(metric, mean)} ± {_fmt(metric, std)} ({len(values)})"
    return cell + (f", {len(values)}/{n_jobs} reached" if counted else "")


def display_name(factors: dict, names: list[dict], short: bool = False) -> str:
    """A configuration's label (``"dropout=0.25, dense_dropout=0.0"``) after the first ``study.names``
    entry it matches (``"conv only (dropout=0.25, ...)"``; ``short``: the name alone)."""
    text = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in factors.items()}
    label, name = config_label(text), next((n["name"] for n in names if matches(text, n["when"])), None)
    return label if name is None else name if short else f"{name} ({label})"


def _sentence(comparison: dict, result: dict, label: str, a: str, b: str, headline: bool) -> str:
    """The answer's sentence for one comparison: in full for the headline, short for the others."""
    metric = comparison["metric"]
    diff = _fmt(metric, abs(result["diff"]))
    if headline:
        if float(diff) == 0:
            text = f"{label} differs by less than {_fmt(metric, 0.5 * 10 ** -len(diff.split('.')[-1]))} " \
                   f"between {a} and {b}"
        else:
            text = f"{label} is {diff} {'higher' if result['diff'] > 0 else 'lower'} for {a} than for {b}"
    else:
        text = f"{a} against {b}, {label}: {_signed(metric, result['diff'])}"
    if math.isnan(result["p"]):
        return text + f" (n = {result['n_a']} vs {result['n_b'] or 1}: no t-test, too few runs or no spread)"
    ci = f"95 % CI {_signed(metric, result['low'])} to {_signed(metric, result['high'])}"
    if not headline:
        return f"{text} ({ci}, p = {result['p']:.3g}{'' if result['significant'] else ', not significant'})"
    test = "Welch's t" if "b" in comparison else "one-sample t"
    stats_ = (f"difference {_signed(metric, result['diff'])}, {ci}; {test} = {result['t']:.2f}, "
              f"df = {result['df']:.1f}, p = {result['p']:.3g}; n = {result['n_a']}"
              + (f" vs {result['n_b']}" if result["n_b"] else ""))
    verdict = ("significant at the 5 % level" if result["significant"]
               else "not significant at the 5 % level: these runs do not tell the two apart")
    return f"{text} ({stats_}): {verdict}"


def write_report(sweep_dir: str | Path, spec: dict | None = None, rows: list[dict] | None = None) -> Path | None:
    """Write ``report.md`` into a study's sweep dir, after :func:`mnist_lab.sweep.write_summary` (whose
    plots it links); returns its path, or None for a plain sweep. ``spec``: the ``study`` node (None:
    from the jobs' configs); ``rows``: the jobs as :func:`mnist_lab.sweep.collect` reads them (None: read).
    A comparison whose configurations are not in the sweep or have no value gets a row of dashes saying so.

    Raises:
        FileNotFoundError: ``sweep_dir`` holds no Hydra job dirs.
    """
    sweep_dir = Path(sweep_dir)
    spec = spec or study_spec(sweep_dir)
    if spec is None:
        return None
    rows = collect(sweep_dir) if rows is None else rows
    if not rows:
        raise FileNotFoundError(f"no Hydra job dirs (*/.hydra/overrides.yaml) under {sweep_dir}")
    report, failed = _Report(spec, rows), [r for r in rows if r["status"] != "completed"]
    lines = report.header() + report.results(sweep_dir) + report.comparisons()
    if failed:
        lines += ["", f"{len(failed)} jobs did not complete and are left out (their errors: summary.md)."]
    write_text_atomic(sweep_dir / "report.md", "\n".join(lines) + "\n")
    return sweep_dir / "report.md"


class _Report:
    """The parts of one study's ``report.md``, from its ``study`` node and its jobs."""

    def __init__(self, spec: dict, rows: list[dict]):
        self.spec, self.rows = spec, rows
        self.threshold, self.names = float(spec.get("threshold", 0.99)), spec.get("names", [])
        self.completed = [r for r in rows if r["status"] == "completed"]
        self.varying = varying_factors(rows)
        self.configs: dict[tuple, list[dict]] = {}
        for row in self.completed:
            self.configs.setdefault(tuple((k, row["factors"].get(k)) for k in self.varying), []).append(row)
        self.seeds = sorted({r["factors"].get("seed", "") for r in rows}, key=lambda s: (len(s), s))  # 2 before 10
        self.headline = spec["comparisons"][0]["metric"] if spec.get("comparisons") else spec["columns"][0]

    def values(self, members: list[dict], metric: str) -> list[float]:
        return [v for v in (job_value(m, metric, self.threshold) for m in members) if v is not None]

    def label(self, metric: str) -> str:
        if metric not in LABELS and ROBUST.fullmatch(metric):
            return "acc, {} {}".format(*ROBUST.fullmatch(metric).groups())
        if STEPS_TO.fullmatch(metric):
            return f"steps to val acc ≥ {STEPS_TO.fullmatch(metric).group(1)}"
        if GAP_AT.fullmatch(metric):
            return f"train−val gap, epoch {GAP_AT.fullmatch(metric).group(1)}"
        return LABELS.get(metric, metric).format(threshold=self.threshold)

    def header(self) -> list[str]:
        spec, rows = self.spec, self.rows
        grid = {k: sorted({r["factors"].get(k) for r in rows}, key=str) for k in self.varying}
        fixed = sorted({f"{k}={v}" for r in rows for k, v in r["factors"].items()
                        if k not in self.varying and k != "seed"})
        points = "; ".join(k + " ∈ {" + ", ".join(v) + "}" for k, v in grid.items()) or "(one configuration)"
        return [f"# Study: {spec['name']}", "", f"**Question.** {spec['question']}", "",
                f"**Protocol.** {spec.get('protocol', '')}", "",
                f"**Grid.** {points}; seeds {', '.join(self.seeds)}: {len(rows)} jobs, {len(self.completed)} completed."
                + (f" Other overrides of this run: {', '.join(fixed)}." if fixed else ""), "",
                f"**Cut to fit the time budget.** {spec.get('cut', 'nothing')}", "",
                f"Regenerate: `python -m mnist_lab.train +study={spec['name']} +launcher=cpu_parallel` (then "
                f"`python scripts/summarize_sweep.py SWEEP_DIR` rewrites this report from the run dirs)."]

    def results(self, sweep_dir: Path) -> list[str]:
        """The table (mean ± std (n) per configuration, the headline per seed) and the figures."""
        columns, headline = self.spec["columns"], self.headline
        lines = ["", "## Results", "", "Mean ± sample std (n = runs with a value) over seeds; the last column "
                 "lists the headline value of every run, by seed (– : no value).", "",
                 "| configuration | " + " | ".join(self.label(c) for c in columns)
                 + f" | {self.label(headline)} per seed ({', '.join(self.seeds)}) |",
                 "| --- |" + " ---: |" * len(columns) + " --- |"]
        for key, members in self.configs.items():
            cells = [_cell(c, self.values(members, c), len(members)) for c in columns]
            by_seed = {m["factors"].get("seed", ""): job_value(m, headline, self.threshold) for m in members}
            cells.append(", ".join("–" if by_seed.get(s) is None else _fmt(headline, by_seed[s]) for s in self.seeds))
            lines.append(f"| {display_name(dict(key), self.names)} | " + " | ".join(cells) + " |")
        plots = list(self.spec.get("plots", []))
        for metric in self.spec.get("run_curves", []):  # every run's curve, e.g. val/loss per epoch
            runs = {display_name(dict(key), self.names, short=True): [m["history"].get(metric, {}) for m in members]
                    for key, members in self.configs.items()}
            plots.append(f"runs_{metric.replace('/', '_')}.png")
            plot_run_curves(runs, metric, sweep_dir / plots[-1], title=f"study: {self.spec['name']}")
        for metric in self.spec.get("step_curves", []):  # every run's curve against optimizer steps
            runs = {display_name(dict(key), self.names, short=True): [m["steps"].get(metric, {}) for m in members]
                    for key, members in self.configs.items()}
            plots.append(f"steps_{metric.replace('/', '_')}.png")
            plot_run_curves(runs, metric, sweep_dir / plots[-1], title=f"study: {self.spec['name']}",
                            x="optimizer step")
        plots = [p for p in plots if (sweep_dir / p).is_file()]
        return lines + ([""] + [f"![{p.removesuffix('.png').replace('_', ' ')}]({p})" for p in plots] if plots else [])

    def comparisons(self) -> list[str]:
        """The comparisons table (a − b, 95 % CI, t, df, p, n) and the answer, headline first."""
        lines = ["", "## Comparisons", "",
                 "Difference of the means (a − b, or a − the published figure), 95 % confidence interval, "
                 "two-sided t-test (Welch's for two groups, one-sample against a published figure).", "",
                 "| a | b | metric | a − b | 95 % CI | t | df | p | n | significant (5 %) |",
                 "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | --- | :---: |"]
        sentences = []
        for c in self.spec.get("comparisons", []):
            metric, label = c["metric"], self.label(c["metric"])
            a = self.values([r for r in self.completed if matches(r["factors"], c["a"])], metric)
            b = None if "published" in c else self.values([r for r in self.completed if matches(r["factors"], c["b"])],
                                                          metric)
            name_a = display_name(c["a"], self.names)
            versus = f"published {c['published']}" if b is None else display_name(c["b"], self.names)
            if not a or b == []:
                selectors = [c["a"], *([c["b"]] if b is not None else [])]
                why = ("not in this sweep" if not all(any(matches(r["factors"], s) for r in self.rows)
                                                      for s in selectors) else "no completed run with a value")
                lines.append(f"| {name_a} | {versus} | {label} | – | {why} | – | – | – | – | no |")
                sentences.append(f"{name_a} against {versus}, {label}: {why}")
                continue
            result = compare(a, b, c.get("published"))
            ci = "–" if math.isnan(result["low"]) else f"{_signed(metric, result['low'])} to " \
                                                       f"{_signed(metric, result['high'])}"
            n = f"{result['n_a']}" + (f" vs {result['n_b']}" if b is not None else "")
            nums = ("–", "–", "–") if math.isnan(result["p"]) else (
                f"{result['t']:.2f}", f"{result['df']:.1f}", f"{result['p']:.3g}")
            lines.append(f"| {name_a} | {versus} | {label} | {_signed(metric, result['diff'])} | {ci} | "
                         f"{' | '.join(nums)} | {n} | {'yes' if result['significant'] else 'no'} |")
            short_b = versus if b is None else display_name(c["b"], self.names, short=True)
            sentences.append(_sentence(c, result, label, display_name(c["a"], self.names, short=True), short_b,
                                       headline=not sentences))
        if sentences:
            lines += ["", "## Answer", "", f"Headline: {sentences[0]}."
                      + (f" Other comparisons (a − b): {'; '.join(sentences[1:])}." if sentences[1:] else "")]
        return lines
