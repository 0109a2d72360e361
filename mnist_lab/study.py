"""Studies: a sweep that answers one research question (``conf/study/<name>.yaml``, run with ``python -m
mnist_lab.train +study=<name>``), and its ``report.md``. The ``study`` node (its keys: docs/studies/README.md)
is saved in every job's ``.hydra/config.yaml``; columns and comparisons name per-job values (results.py)."""

import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from mnist_lab import results
from mnist_lab.data import DATASETS
from mnist_lab.errors import ConfigError
from mnist_lab.plots import plot_isolation, plot_run_curves
from mnist_lab.results import Job, aggregate, as_yaml, config_label, factors, markdown, matches, read_summary
from mnist_lab.rundir import read_history, write_text_atomic
from mnist_lab.stats import compare
from mnist_lab.tuning import choices

#: Names of the per-job values in the report's prose and table headers (others: spelled out, or their name).
LABELS = {
    "test/acc": "test acc", "test/f1_macro": "test macro-F1", "test/loss": "test loss", "test/ece": "test ECE",
    "best_val/acc": "best val acc", "best_val/loss": "best val loss", "params_trainable": "trainable params",
    "train_seconds": "train s", "epochs": "epochs", "gap": "train−val gap", "flops_per_image": "FLOPs / image",
    "robustness/mean": "robust acc (mean)", "robustness/rotation_20": "acc, rotated 20°",
    "robustness/translation_4": "acc, shifted 4 px", "val_loss_epoch1": "val loss after epoch 1",
    "val_loss_auc": "val loss, mean over steps", "max_grad_norm": "largest grad norm",
    "final_grad_norm": "grad norm, last 10 % of steps", "update_ratio_first": "update ratio, first layer",
    "update_ratio_last": "update ratio, last layer",
    "steps_to_val_acc": "steps to val acc ≥ {}", "epochs_to_val_acc": "epochs to val acc ≥ {}",
    "gap_epoch": "train−val gap, epoch {}", "robustness": "acc, {} {}",
}


def label(metric: str) -> str:
    """A value's name in prose (:data:`LABELS`)."""
    if metric in LABELS:
        return LABELS[metric]
    if metric.startswith("robustness/"):
        return LABELS["robustness"].format(*metric.removeprefix("robustness/").rsplit("_", 1))
    kind, _, arg = metric.rpartition("_")
    return LABELS[kind].format(arg) if kind in LABELS else metric


def values_of(spec: dict) -> list[str]:
    """The per-job values a study reads, its columns and comparisons; ``epochs_to_threshold`` is named by
    the study's ``threshold`` (``epochs_to_val_acc_0.99``)."""
    named = [*spec["columns"], *(c["metric"] for c in spec.get("comparisons", []))]
    return list(dict.fromkeys(_metric(spec, m) for m in named))


def _metric(spec: dict, metric: str) -> str:
    return f"epochs_to_val_acc_{float(spec.get('threshold', 0.99)):g}" if metric == "epochs_to_threshold" else metric


def check_spec(spec: dict, keys: set[str]) -> None:
    """Check a ``study`` node before its sweep starts; ``keys``: what the sweep varies or sets (no ``+``).

    Raises:
        ConfigError: a missing ``name`` / ``question`` / ``columns``, a metric that is not a per-job value,
            a ``names`` entry or comparison selecting on a key the sweep does not set, a comparison with
            neither ``b`` nor ``published``, or a ``nuisance`` entry that is not a list of values.
    """
    where = f"study {spec.get('name', '?')}"
    for key in ("name", "question", "columns"):
        if not spec.get(key):
            raise ConfigError(f"{where}: study.{key} is missing; every study needs name, question and columns")
    for metric in [*spec["columns"], *(c.get("metric") for c in spec.get("comparisons", []))]:
        if not results.is_value(_metric(spec, str(metric))):
            raise ConfigError(f"{where}: unknown value {metric!r}; use one of {', '.join(results.VALUES)}, "
                              "robustness/<kind>_<strength> (e.g. robustness/noise_0.3), steps_to_val_acc_<acc>, "
                              "epochs_to_val_acc_<acc> or gap_epoch_<n>")
    for key, values in (spec.get("nuisance") or {}).items():
        if isinstance(values, str) or not isinstance(values, Sequence) or not values:
            raise ConfigError(f"{where}: study.nuisance.{key}={values!r} must be a list of the values to try, e.g. "
                              "[0.001, 0.003]")
    selectors = [(f"study.names entry {e['name']!r}", e["when"]) for e in spec.get("names", [])]
    for c in spec.get("comparisons", []):
        if ("b" in c) == ("published" in c):
            raise ConfigError(f"{where}: comparison {c} needs either b (a configuration) or published (a number)")
        selectors.append((f"comparison {c}", {**c["a"], **c.get("b", {})}))
    for what, selector in selectors:
        for key in set(selector) - keys:
            raise ConfigError(f"{where}: {what} selects on {key!r}, which the sweep does not set; use one of "
                              f"{', '.join(sorted(keys))}")


def spec_of(cfg: DictConfig) -> dict | None:
    """A config's ``study`` node as a dict, with the ``dataset`` it runs on; None for a plain sweep."""
    if cfg.get("study") is None:
        return None
    return {**OmegaConf.to_container(cfg.study, resolve=True), "dataset": OmegaConf.select(cfg, "data.dataset")}


def study_spec(sweep_dir: str | Path) -> dict | None:
    """:func:`spec_of` the first job's saved ``.hydra/config.yaml``; None for a plain sweep, or the nuisance
    trials of a study (no report of their own)."""
    configs = (OmegaConf.load(f) for f in sorted(Path(sweep_dir).rglob(".hydra/config.yaml")))
    return next((spec_of(c) for c in configs if c.get("test", True)), None)


def _counted(metric: str) -> bool:  # "not reached" is no value: the cell says how many reached it
    return metric.startswith(("steps_to_val_acc_", "epochs_to_val_acc_"))


def _fmt(metric: str, value: float) -> str:
    if metric in ("params_trainable", "flops_per_image"):
        return f"{value:,.0f}"
    if metric.startswith("update_ratio"):
        return f"{value:.2e}"
    return f"{value:.1f}" if metric in ("train_seconds", "epochs") or _counted(metric) else f"{value:.4f}"


def _signed(metric: str, value: float) -> str:
    return "–" if math.isnan(value) else ("+" if value >= 0 else "-") + _fmt(metric, abs(value))


def _cell(metric: str, group: pd.Series) -> str:
    """A configuration's mean ± sample std (n) of ``metric``."""
    mean, std, n = group[metric], group[f"{metric} std"], int(group[f"{metric} n"])
    reached = f", {n}/{int(group['n'])} reached" if _counted(metric) else ""
    if n == 0 or metric in ("params_trainable", "flops_per_image"):  # the same for every seed
        return f"–{reached}" if n == 0 else _fmt(metric, mean)
    return f"{_fmt(metric, mean)} ± {_fmt(metric, std)} ({n}){reached}"


def _sentence(comparison: dict, result: dict, name: str, a: str, b: str, headline: bool) -> str:
    """The answer's sentence for one comparison: in full for the headline, short for the others."""
    metric, diff = comparison["metric"], _fmt(comparison["metric"], abs(result["diff"]))
    if not headline:
        text = f"{a} against {b}, {name}: {_signed(metric, result['diff'])}"
    elif float(diff.replace(",", "")) == 0:
        text = f"{name} differs by less than {_fmt(metric, 0.5 * 10 ** -len(diff.split('.')[-1]))} between {a} and {b}"
    else:
        text = f"{name} is {diff} {'higher' if result['diff'] > 0 else 'lower'} for {a} than for {b}"
    if math.isnan(result["p"]):
        return text + f" (n = {result['n_a']} vs {result['n_b'] or 1}: no t-test, too few runs or no spread)"
    ci = f"95 % CI {_signed(metric, result['low'])} to {_signed(metric, result['high'])}"
    if not headline:
        return f"{text} ({ci}, p = {result['p']:.3g}{'' if result['significant'] else ', not significant'})"
    test = "Welch's t" if "b" in comparison else "one-sample t"
    numbers = (f"difference {_signed(metric, result['diff'])}, {ci}; {test} = {result['t']:.2f}, "
               f"df = {result['df']:.1f}, p = {result['p']:.3g}; n = {result['n_a']}"
               + (f" vs {result['n_b']}" if result["n_b"] else ""))
    verdict = ("significant at the 5 % level" if result["significant"]
               else "not significant at the 5 % level: these runs do not tell the two apart "
               f"(with 80 % power they detect a difference of {_fmt(metric, result['detectable'])} or more; "
               f"{_seeds(result)} per arm would detect the observed one)")
    return f"{text} ({numbers}): {verdict}"


def _seeds(result: dict) -> str:
    return "–" if result["significant"] or math.isnan(result["p"]) else \
        "more than 100,000 seeds" if result["seeds_needed"] is None else f"{result['seeds_needed']:,} seeds"


def write_report(sweep_dir: str | Path, spec: dict, table: pd.DataFrame) -> Path:
    """Write ``report.md`` into a study's sweep dir from its jobs table (:func:`mnist_lab.results.collect`,
    or ``read_summary`` of its ``summary.csv``) and its ``study`` node, after the sweep summary, whose plots
    it links; returns its path. Values the table lacks are computed from its rows (those of a run's history
    are then missing). A comparison whose configurations are not in the sweep, or have no value, gets a row
    of dashes saying so."""
    sweep_dir, table = Path(sweep_dir), table.copy()
    spec = {**spec, "columns": [_metric(spec, c) for c in spec["columns"]],
            "comparisons": [{**c, "metric": _metric(spec, c["metric"])} for c in spec.get("comparisons", [])]}
    for metric in (m for m in values_of(spec) if m not in table):
        table[metric] = [results.job_value(Job.from_row(row), metric) for _, row in table.iterrows()]
    report = _Report(spec, table)
    lines = report.header() + report.results(sweep_dir) + report.tuning(sweep_dir) + report.comparisons()
    if failed := int((table["status"] != "completed").sum()):
        lines += ["", f"{failed} jobs did not complete and are left out (their errors: summary.md)."]
    write_text_atomic(sweep_dir / "report.md", "\n".join(lines) + "\n")
    return sweep_dir / "report.md"


class _Report:
    """The parts of one study's ``report.md``, from its ``study`` node and its jobs table."""

    def __init__(self, spec: dict, table: pd.DataFrame):
        self.spec, self.table, self.names = spec, table, spec.get("names", [])
        self.done, self.varying, self.groups = table[table["status"] == "completed"], factors(table), aggregate(table)
        seeds = set(table["seed"].fillna("").astype(str)) if "seed" in table else {""}
        self.seeds = sorted(seeds, key=lambda s: (len(s), s))  # 2 before 10
        self.headline = spec["comparisons"][0]["metric"] if spec["comparisons"] else spec["columns"][0]

    def name(self, config: dict, short: bool = False) -> str:
        """A configuration's label after the first ``study.names`` entry it matches."""
        text = {k: as_yaml(v) for k, v in config.items()}
        found = next((n["name"] for n in self.names if all(text.get(k) == as_yaml(v) for k, v in n["when"].items())),
                     None)
        return config_label(text) if found is None else found if short else f"{found} ({config_label(text)})"

    def members(self, selector: dict) -> pd.DataFrame:
        return self.done[matches(self.done, selector)]

    def header(self) -> list[str]:
        spec, table = self.spec, self.table
        grid = "; ".join(k + " ∈ {" + ", ".join(sorted(set(table[k].dropna().astype(str)) - {""})) + "}"
                         for k in self.varying) or "(one configuration)"
        shared = results.fixed(table)
        return [f"# Study: {spec['name']}", "", f"**Question.** {spec['question']}", "",
                f"**Protocol.** {spec.get('protocol', '')}", "",
                f"**Dataset.** {DATASETS[spec.get('dataset') or 'mnist'].__name__} (data.dataset)", "",
                f"**Grid.** {grid}; seeds {', '.join(self.seeds)}: {len(table)} jobs, {len(self.done)} completed."
                + (f" Other overrides of this run: {', '.join(shared)}." if shared else ""), "",
                f"**Cut to fit the time budget.** {spec.get('cut', 'nothing')}", "",
                f"Regenerate: `python -m mnist_lab.train +study={spec['name']} +launcher=cpu_parallel` (then "
                f"`python scripts/summarize_sweep.py SWEEP_DIR` rewrites this report from the run dirs)."]

    def results(self, sweep_dir: Path) -> list[str]:
        """The table (mean ± std (n) per configuration, the headline per seed) and the figures."""
        columns, headline, rows = self.spec["columns"], self.headline, []
        for _, group in self.groups.iterrows():
            members = self.members(group[self.varying].to_dict())
            by_seed = dict(zip(members["seed"].astype(str) if "seed" in members else [""],
                               pd.to_numeric(members[headline])))
            per_seed = ", ".join("–" if pd.isna(by_seed.get(s)) else _fmt(headline, by_seed[s]) for s in self.seeds)
            rows.append([self.name(group[self.varying].to_dict()), *(_cell(c, group) for c in columns), per_seed])
        lines = ["", "## Results", "", "Mean ± sample std (n = runs with a value) over seeds; the last column "
                 "lists the headline value of every run, by seed (– : no value).", "",
                 *markdown(["configuration", *map(label, columns), f"{label(headline)} per seed "
                            f"({', '.join(self.seeds)})"], rows, "l" + "r" * len(columns) + "l")]
        plots = list(self.spec.get("plots", []))
        for metric, by in ([(m, "epoch") for m in self.spec.get("run_curves", [])]
                           + [(m, "step") for m in self.spec.get("step_curves", [])]):
            runs = {self.name(g[self.varying].to_dict(), short=True): [
                read_history(sweep_dir / job / "metrics.csv", by=by).get(metric, pd.Series(dtype=float)).dropna()
                for job in self.members(g[self.varying].to_dict())["job"]] for _, g in self.groups.iterrows()}
            plots.append(f"{'runs' if by == 'epoch' else 'steps'}_{metric.replace('/', '_')}.png")
            if any(len(curve) for curves in runs.values() for curve in curves):
                plot_run_curves(runs, metric, sweep_dir / plots[-1], title=f"study: {self.spec['name']}",
                                x="epoch" if by == "epoch" else "optimizer step")
        plots = [p for p in plots if (sweep_dir / p).is_file()]
        return lines + ([""] + [f"![{p.removesuffix('.png').replace('_', ' ')}]({p})" for p in plots] if plots else [])

    def tuning(self, sweep_dir: Path) -> list[str]:
        """A study with ``nuisance``: the grid, each arm's choice, the isolation plot and the trainings."""
        nuisance, path = list(self.spec.get("nuisance") or []), sweep_dir / "nuisance" / "summary.csv"
        if not nuisance or not path.is_file():
            return []
        best, arms = choices(trials := read_summary(path), nuisance)
        done = [r for _, r in trials[trials["status"] == "completed"].iterrows()]
        plot_isolation(pd.DataFrame([{**r, "arm": self.name(r[arms].to_dict(), short=True) if arms else "all",
                                      "label": config_label(r[nuisance].to_dict()), "chosen": r.name in best.index}
                                     for r in done]), sweep_dir / "isolation.png",
                       title=f"study: {self.spec['name']}: nuisance trials")
        grid = "; ".join(f"{k} ∈ {{{', '.join(map(str, v))}}}" for k, v in self.spec["nuisance"].items())
        rows = [[self.name(r[arms].to_dict()) if arms else "all", *r[nuisance], f"{r['best_val/acc']:.4f}"]
                for _, r in best.iterrows()]
        return ["", "## Tuning", "", f"Nuisance hyper-parameters, tuned for each arm: {grid}; one trial each at seed "
                f"{trials['seed'].iloc[0]}, the best by validation accuracy chosen (no trial reads the test split; "
                f"their runs: nuisance/summary.md). Trainings: {len(trials)} trials + {len(self.table)} final runs = "
                f"{len(trials) + len(self.table)}.", "",
                *markdown(["arm", *(f"{k} (chosen)" for k in nuisance), "best val acc"], rows,
                          "l" + "r" * (len(nuisance) + 1)), "", "![isolation](isolation.png)"]

    def comparisons(self) -> list[str]:
        """The comparisons table (a − b, 95 % CI, t, df, p, n) and the answer, headline first."""
        rows, sentences = [], []
        for c in self.spec["comparisons"]:
            metric, name = c["metric"], label(c["metric"])
            a = pd.to_numeric(self.members(c["a"])[metric]).dropna().tolist()
            b = None if "published" in c else pd.to_numeric(self.members(c["b"])[metric]).dropna().tolist()
            name_a, versus = self.name(c["a"]), f"published {c['published']}" if b is None else self.name(c["b"])
            if not a or b == []:
                present = all(matches(self.table, s).any() for s in [c["a"], *([c["b"]] if b is not None else [])])
                why = "no completed run with a value" if present else "not in this sweep"
                rows.append([name_a, versus, name, "–", why, "–", "–", "–", "–", "no", "–", "–"])
                sentences.append(f"{name_a} against {versus}, {name}: {why}")
                continue
            r = compare(a, b, c.get("published"))
            ci = "–" if math.isnan(r["low"]) else f"{_signed(metric, r['low'])} to {_signed(metric, r['high'])}"
            numbers = ["–"] * 3 if math.isnan(r["p"]) else [f"{r['t']:.2f}", f"{r['df']:.1f}", f"{r['p']:.3g}"]
            n = f"{r['n_a']}" + (f" vs {r['n_b']}" if b is not None else "")
            rows.append([name_a, versus, name, _signed(metric, r["diff"]), ci, *numbers, n,
                         "yes" if r["significant"] else "no",
                         "–" if math.isnan(r["detectable"]) else _fmt(metric, r["detectable"]), _seeds(r)])
            sentences.append(_sentence(c, r, name, self.name(c["a"], short=True),
                                       versus if b is None else self.name(c["b"], short=True), headline=not sentences))
        lines = ["", "## Comparisons", "", "Difference of the means (a − b, or a − the published figure), 95 % "
                 "confidence interval, two-sided t-test (Welch's for two groups, one-sample against a published "
                 "figure); the smallest difference these runs detect with 80 % power, and for a difference that "
                 "is not significant the seeds per arm that would detect it (noncentral t, the observed standard "
                 "deviations).", "", *markdown(["a", "b", "metric", "a − b", "95 % CI", "t", "df", "p", "n",
                                                "significant (5 %)", "detectable (80 % power)",
                                                "seeds for 80 % power"], rows, "lllrlrrrlcrr")]
        return lines + (["", "## Answer", "", f"Headline: {sentences[0]}."
                         + (f" Other comparisons (a − b): {'; '.join(sentences[1:])}." if sentences[1:] else "")]
                        if sentences else [])
