"""Studies (conf/study/*.yaml, mnist_lab/study.py): each study's whole grid runs on tiny synthetic
settings, and its report's table and statistics agree with a hand computation from the run dirs."""

import csv
import itertools
import json
import math
import re
import shutil
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import QUIET, REPO, cli
from omegaconf import OmegaConf
from scipy import stats

from mnist_lab.config import load_config
from mnist_lab.errors import ConfigError
from mnist_lab.results import Job, job_value, matches, read_summary
from mnist_lab.stats import compare
from mnist_lab.study import check_spec, spec_of, values_of, write_report

CONF = Path(__file__).resolve().parents[1] / "conf" / "study"
FAST = ["trainer.max_epochs=2", "trainer.limit_train_batches=3",  # one-cycle needs >= 3 steps per epoch
        "plots=false", *QUIET]
CELL = re.compile(r"^([-\d.,e+]+)(?: ± ([-\d.e+]+) \((\d+)\))?")
STUDIES = sorted(p.stem for p in CONF.glob("*.yaml"))


def hand_values(job: Path, metric: str, threshold: float) -> float | None:
    """A job's value of `metric`, read straight from its metrics.json / metrics.csv."""
    metrics = json.loads((job / "metrics.json").read_text())
    with open(job / "metrics.csv", newline="") as f:
        epochs = [r for r in csv.DictReader(f) if r.get("val/acc")]
    if metric == "gap":
        return metrics["last_train/acc"] - metrics["last_val/acc"]
    if metric == "val_loss_epoch1":
        return float(epochs[0]["val/loss"])
    if metric == "epochs_to_threshold":
        return next((i + 1 for i, r in enumerate(epochs) if float(r["val/acc"]) >= threshold), None)
    if metric == "robustness/noise_0.3":
        return json.loads((job / "robustness.json").read_text())["accuracy"]["noise"]["0.3"]
    with open(job / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if metric.startswith("steps_to_val_acc_"):
        t = float(metric.rsplit("_", 1)[1])
        return next((int(r["step"]) + 1 for r in rows if r.get("val/acc") and float(r["val/acc"]) >= t), None)
    if metric == "val_loss_auc":
        steps, losses = zip(*[(int(r["step"]), float(r["val/loss"])) for r in rows if r.get("val/loss")])
        return float(np.trapezoid(losses, steps)) / (steps[-1] - steps[0])
    if metric.endswith("grad_norm"):
        norms = [float(r["dynamics/grad_norm"]) for r in rows if r.get("dynamics/grad_norm")]
        return max(norms) if metric == "max_grad_norm" else statistics.fmean(norms[-max(1, len(norms) // 10):])
    if metric.startswith("gap_epoch_"):
        epoch = str(int(metric.rsplit("_", 1)[1]) - 1)
        train = [float(r["train/acc"]) for r in rows if r.get("train/acc") and r["epoch"] == epoch]
        val = [float(r["val/acc"]) for r in rows if r.get("val/acc") and r["epoch"] == epoch]
        return train[-1] - val[-1] if train and val else None
    if metric.startswith("update_ratio_"):  # conv2 and conv2_bn: the first conv and the output Linear
        heads = sorted((c for c in rows[0] if c.startswith("update_ratio/head.")), key=lambda c: int(c.rsplit(".")[-1]))
        column = "update_ratio/backbone.0" if metric == "update_ratio_first" else heads[-1]
        return statistics.fmean(float(r[column]) for r in rows if r.get(column))
    return metrics.get(metric)


def welch_by_hand(a, b):
    """Welch's t, Welch–Satterthwaite df, two-sided p and the 95 % CI of mean(a) - mean(b)."""
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff, se = statistics.fmean(a) - statistics.fmean(b), math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    q = stats.t.ppf(0.975, df)
    return {"diff": diff, "t": diff / se, "df": df, "p": 2 * stats.t.sf(abs(diff / se), df),
            "low": diff - q * se, "high": diff + q * se}


def test_welch_and_one_sample_statistics_match_the_textbook_formulas():
    a, b = [0.990, 0.992, 0.9905], [0.985, 0.989, 0.986, 0.9875]
    got, want = compare(a, b), welch_by_hand(a, b)
    for key in ("diff", "t", "df", "p", "low", "high"):
        assert got[key] == pytest.approx(want[key], rel=1e-9), key
    assert got["significant"] and got["n_a"] == 3 and got["n_b"] == 4
    # one sample against a published figure: t = (mean - x) / (s / sqrt(n)), n - 1 df
    one = compare(a, published=0.9893)
    se = statistics.stdev(a) / math.sqrt(3)
    t = (statistics.fmean(a) - 0.9893) / se
    assert one["t"] == pytest.approx(t) and one["df"] == 2
    assert one["low"] == pytest.approx(statistics.fmean(a) - 0.9893 - stats.t.ppf(0.975, 2) * se)
    assert one["p"] == pytest.approx(2 * stats.t.sf(abs(t), 2))
    # no spread, or a single run: no test, never "significant"
    flat = compare([1.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    assert math.isnan(flat["p"]) and math.isnan(flat["low"]) and not flat["significant"]
    assert math.isnan(compare([0.99], [0.98, 0.97])["t"])


def test_a_selector_matches_overrides_as_written_in_yaml():
    jobs = pd.DataFrame({"model.batchnorm": ["true", "false"], "optimizer.lr": ["0.01", "0.01"], "seed": ["0", "0"]})
    assert matches(jobs, {"model.batchnorm": True, "optimizer.lr": 0.01}).tolist() == [True, False]
    assert matches(jobs, {"model.batchnorm": "false"}).tolist() == [False, True]
    assert not matches(jobs, {"model.width": "2"}).any()  # a key the sweep does not set


@pytest.mark.parametrize("name", STUDIES)
def test_each_study_runs_its_grid_and_its_report_matches_a_hand_computation(name, synthetic_root, tmp_path):
    sweep = tmp_path / "study"
    extra = {"augmentation": ["eval.max_images=100",  # the perturbations its columns read, of 100 images
                              "+eval.perturbations={rotation:[0,20],translation:[0,4],noise:[0.3]}"],
             # validations and records within 3 steps an epoch:
             "dynamics": ["trainer.max_epochs=5", "trainer.val_check_interval=1", "callbacks.dynamics.every_n_steps=2"],
             }.get(name, [])
    proc = cli("mnist_lab.train", f"+study={name}", *FAST, *extra, f"hydra.sweep.dir={sweep}", data_root=synthetic_root,
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"report: {sweep / 'report.md'}" in proc.stdout
    cfg = load_config([f"+study={name}"], hydra=True)  # a tuned study's YAML extends an untuned one
    spec, grid = cfg.study, cfg.hydra.sweeper.params
    threshold = float(spec.get("threshold", 0.99))

    # the whole grid ran, seeds 0, 1, 2 (>= 3 seeds per configuration)
    axes = {k.lstrip("+"): str(v).split(",") for k, v in grid.items()}
    assert axes["seed"] == ["0", "1", "2"]
    jobs = {}
    for job in sweep.iterdir():
        if (job / ".hydra").is_dir():  # a tuned study's nuisance trials are a sweep of their own
            overrides = OmegaConf.load(job / ".hydra" / "overrides.yaml")  # the job's full record
            factors = dict(str(o).split("=", 1) for o in overrides)
            jobs[job] = {k.lstrip("+"): v.lower() for k, v in factors.items()}
    configs = [dict(zip([k for k in axes if k != "seed"], combo, strict=True))
               for combo in itertools.product(*(v for k, v in axes.items() if k != "seed"))]
    assert len(jobs) == 3 * len(configs)

    report = (sweep / "report.md").read_text()
    assert spec.question.split()[0] in report and "**Cut to fit the time budget.**" in report
    for png in [*spec.plots, *(f"runs_{m.replace('/', '_')}.png" for m in spec.get("run_curves", [])),
                *(f"steps_{m.replace('/', '_')}.png" for m in spec.get("step_curves", []))]:
        assert f"]({png})" in report and (sweep / png).stat().st_size > 10_000
    table = {}
    for line in report.split("## Results")[1].split("## Comparisons")[0].split("## Tuning")[0].splitlines():
        if line.startswith("| ") and not line.startswith(("| configuration", "| ---")):
            cells = [c.strip() for c in line.strip("|").split("|")]
            label = re.sub(r"^.* \((.*)\)$", r"\1", cells[0])  # "conv only (dropout=0.25, ...)": the factors
            table[label] = dict(zip([*spec.columns, "per seed"], cells[1:], strict=True))
    assert len(table) == len(configs)

    def members(selector):
        text = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in selector.items()}
        return [job for job, factors in jobs.items() if all(factors.get(k) == v for k, v in text.items())]

    # the table: mean ± sample std (n) of every column, per configuration, from the run dirs
    checked = 0
    for config in configs:
        label = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in sorted(config.items()))  # the report sorts keys
        assert len(members(config)) == 3
        for column in spec.columns:
            values = [v for v in (hand_values(j, column, threshold) for j in members(config)) if v is not None]
            cell = table[label][column]
            if not values:
                counted = column == "epochs_to_threshold" or column.startswith("steps_to")
                assert cell == ("–, 0/3 reached" if counted else "–")
                continue
            mean, std, n = CELL.match(cell).groups()
            digits = {"params_trainable": 0, "train_seconds": 1, "epochs_to_threshold": 1}.get(column, 4)
            digits = 1 if column.startswith("steps_to") else digits
            tol = {"abs": 0.5 * 10 ** -digits + 1e-9} if not column.startswith("update_ratio") else {"rel": 6e-3}
            assert float(mean.replace(",", "")) == pytest.approx(statistics.fmean(values), **tol), (label, column)
            if column != "params_trainable":
                std_by_hand = statistics.stdev(values) if len(values) > 1 else 0.0
                assert float(std) == pytest.approx(std_by_hand, **tol) and int(n) == len(values)
            checked += 1
        # the headline value of each run, by seed
        headline = spec.comparisons[0].metric
        by_seed = {jobs[j]["seed"]: hand_values(j, headline, threshold) for j in members(config)}
        listed = table[label]["per seed"].split(", ")
        assert [x == "–" for x in listed] == [by_seed[s] is None for s in ("0", "1", "2")]
        for text, seed in zip(listed, ("0", "1", "2"), strict=True):
            if text != "–":
                assert float(text.replace(",", "")) == pytest.approx(by_seed[seed], abs=0.05 if headline in (
                    "train_seconds", "epochs_to_threshold") or headline.startswith("steps_to") else 5e-5)
    assert checked >= len(configs) * (len(spec.columns) - 1)

    # the comparisons: difference, 95 % CI, Welch's / one-sample t, df, p, as computed by hand
    rows = [line for line in report.split("## Comparisons")[1].split("## Answer")[0].splitlines()
            if line.startswith("| ") and not line.startswith(("| a ", "| ---"))]
    assert len(rows) == len(spec.comparisons)
    for comparison, row in zip(spec.comparisons, rows, strict=True):
        cells = [c.strip() for c in row.strip("|").split("|")]
        a = [v for v in (hand_values(j, comparison.metric, threshold) for j in members(comparison.a)) if v is not None]
        if "published" in comparison:
            diff = statistics.fmean(a) - comparison.published
            se = statistics.stdev(a) / math.sqrt(len(a))
            want = {"diff": diff, "t": diff / se if se else math.nan, "df": len(a) - 1}
            want["p"] = 2 * stats.t.sf(abs(want["t"]), want["df"]) if se else math.nan
        else:
            b = [v for v in (hand_values(j, comparison.metric, threshold) for j in members(comparison.b))
                 if v is not None]
            flat = statistics.variance(a) == 0 and statistics.variance(b) == 0
            want = {"diff": statistics.fmean(a) - statistics.fmean(b), "p": math.nan} if flat else welch_by_hand(a, b)
        digits = 0.05 if comparison.metric == "epochs_to_threshold" or comparison.metric.startswith("steps_to") \
            else 5e-5
        assert float(cells[3]) == pytest.approx(want["diff"], abs=digits)
        if math.isnan(want["p"]):
            assert cells[5:8] == ["–", "–", "–"] and cells[9] == "no"
            continue
        t, df, p = float(cells[5]), float(cells[6]), float(cells[7])
        assert t == pytest.approx(want["t"], abs=0.006) and df == pytest.approx(want["df"], abs=0.06)
        assert p == pytest.approx(want["p"], rel=6e-3, abs=1e-12)  # printed with 3 significant digits
        assert cells[9] == ("yes" if want["p"] < 0.05 else "no")
    # the answer states every tested comparison's p and says which are not significant
    answer = report.split("## Answer")[1]
    tested = [r.split("|")[10].strip() for r in rows if r.split("|")[6].strip() != "–"]
    assert answer.count("p = ") == len(tested) and answer.count("not significant") == tested.count("no")


def trials_and_finals(study: Path) -> tuple[dict, dict]:
    """By hand, from the run dirs: each nuisance trial's (depth, lr) -> best val acc, and each final run's
    (depth, seed) -> the lr its config.yaml trained with."""
    def runs(folder):
        return [(OmegaConf.load(j / "config.yaml"), json.loads((j / "metrics.json").read_text()))
                for j in sorted(folder.iterdir()) if (j / "metrics.json").is_file()]
    trials = {(c.model.depth, c.optimizer.lr): m for c, m in runs(study / "nuisance")}
    finals = {(c.model.depth, c.seed): c.optimizer.lr for c, _ in runs(study)}
    return trials, finals


def test_a_tuned_study_picks_each_arms_lr_on_validation_never_tests_a_trial_and_resumes_to_the_same_choice(
        synthetic_root, tmp_path):
    """+study=depth_tuned on 2 depths x 2 seeds: 8 nuisance trials (4 learning rates at seed 0), none with a
    test/ figure, then 4 final runs, each at its depth's learning rate of the best trial by best_val/acc.
    Killed by SIGTERM in its third trial, `-m resume=` makes the same choices and the same final runs."""
    args = ["-m", "+study=depth_tuned", "model.depth=0,1", "seed=0,1", *FAST, "trainer.deterministic=true",
            *[f"+callbacks.kill.{k}={v}" for k, v in (("_target_", "probes.SignalAtJob"), ("epoch", 1), ("batch", 1),
                                                      ("signal", "SIGTERM"))]]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    proc = cli("mnist_lab.train", *args, f"hydra.sweep.dir={whole}", data_root=synthetic_root, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials, finals = trials_and_finals(whole)
    assert len(trials) == 8 and len(finals) == 4
    for metrics in trials.values():
        assert metrics["status"] == "completed" and metrics["seed"] == 0 and metrics["test_ckpt"] is None
        assert not [k for k in metrics if k.startswith("test/")]  # the test split was never read
    for (depth, _), lr in finals.items():
        by_lr = {lr_: m["best_val/acc"] for (d, lr_), m in trials.items() if d == depth}
        assert lr == max(by_lr, key=by_lr.get)  # first in grid order on a tie, as max() takes
    report = (whole / "report.md").read_text()
    assert "Trainings: 8 trials + 4 final runs = 12." in report and (whole / "isolation.png").stat().st_size > 10_000
    chosen = {depth: lr for (depth, _), lr in finals.items()}
    assert [f"| depth={d} | {lr} |" in report.split("## Tuning")[1] for d, lr in chosen.items()] == [True, True]

    proc = cli("mnist_lab.train", *args, f"hydra.sweep.dir={killed}", data_root=synthetic_root, cwd=tmp_path,
               env={"MNIST_LAB_SIGNAL_JOB": "2"})
    assert proc.returncode == 143 and f"continue with: python -m mnist_lab.train -m resume={killed}" in proc.stderr
    assert not [p for p in killed.iterdir() if (p / ".hydra").is_dir()]  # it died in the nuisance phase
    proc = cli("mnist_lab.train", "-m", f"resume={killed}", data_root=synthetic_root, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("completed before, skipped") == 2  # the two trials before the kill
    assert trials_and_finals(killed)[1] == finals
    def table(path):  # every job's every figure, as summary.csv writes it, but the time
        return pd.read_csv(path, dtype=str, keep_default_na=False).drop(columns="train_seconds").to_dict("records")
    assert table(killed / "summary.csv") == table(whole / "summary.csv")


def test_the_power_figures_match_statsmodels_and_cohens_table():
    """The seeds that detect a difference of d standard deviations with 80 % power (two-sided 5 %):
    Cohen (1988), Statistical Power Analysis, table 2.4.1: d = 0.5 needs 64 per group, d = 0.8 needs 26;
    statsmodels 0.15.0 TTestIndPower().solve_power(effect_size=0.5, alpha=0.05, power=0.8) = 63.77. The
    smallest detectable difference at n = 10 per group, sd 1: TTestIndPower().solve_power(nobs1=10, alpha=0.05,
    power=0.8) = 1.32495; one sample of 10 (TTestPower): 0.99600."""
    from mnist_lab.stats import detectable, power, seeds_needed

    assert seeds_needed(0.5, 1.0, 1.0) == 64 and seeds_needed(0.8, 1.0, 1.0) == 26
    assert power(0.5, 1.0, 64, 1.0, 64) == pytest.approx(0.80146, abs=1e-5)
    assert detectable(1.0, 10, 1.0, 10) == pytest.approx(1.32495, abs=1e-4)
    assert detectable(1.0, 10) == pytest.approx(0.99600, abs=1e-4)
    result = compare([0.1, 0.3, 0.2], [0.15, 0.25, 0.2])  # means equal: not significant
    assert not result["significant"] and result["seeds_needed"] is None  # no difference to detect
    result = compare([0.1, 0.3, 0.2], [0.2, 0.4, 0.3])  # a difference of one sd: d = 1
    assert not result["significant"] and result["seeds_needed"] == seeds_needed(0.1, 0.01, 0.01) == 17
    assert result["detectable"] == pytest.approx(detectable(0.01, 3, 0.01, 3))


def test_a_bad_study_spec_stops_the_sweep_before_training_with_one_line(synthetic_root, tmp_path):
    sweep = tmp_path / "study"
    proc = cli("mnist_lab.train", "+study=depth", "study.columns=[test/accuracy]", *FAST, f"hydra.sweep.dir={sweep}",
               data_root=synthetic_root, cwd=tmp_path)
    assert proc.returncode == 1
    assert "error: study depth: unknown value 'test/accuracy'; use one of params_trainable, test/acc" in proc.stderr
    assert not list(sweep.glob("*/metrics.json"))  # no job ran
    with pytest.raises(ConfigError, match="selects on 'model.width', which the sweep does not set"):
        check_spec({"name": "x", "question": "?", "columns": ["test/acc"],
                    "comparisons": [{"metric": "test/acc", "a": {"model.width": 2}, "b": {"model.depth": 1}}]},
                   {"model.depth", "seed"})
    with pytest.raises(ConfigError, match="needs either b .* or published"):
        check_spec({"name": "x", "question": "?", "columns": ["test/acc"],
                    "comparisons": [{"metric": "test/acc", "a": {"model.depth": 2}}]}, {"model.depth", "seed"})


def test_a_narrowed_study_reports_the_comparisons_it_cannot_make(synthetic_root, tmp_path):
    sweep = tmp_path / "study"
    proc = cli("mnist_lab.train", "+study=depth", "model.depth=0,2", "seed=0,1", *FAST, f"hydra.sweep.dir={sweep}",
               data_root=synthetic_root, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (sweep / "report.md").read_text()
    assert "model.depth ∈ {0, 2}; seeds 0, 1: 4 jobs, 4 completed" in report
    assert report.count("| not in this sweep |") == 3  # every comparison needs depth 1 or 3
    assert "Headline: depth=1 against depth=0, test acc: not in this sweep." in report


@pytest.mark.parametrize("name", sorted(p.parent.name for p in (REPO / "docs" / "studies").glob("*/summary.csv")))
def test_a_committed_report_regenerates_from_its_summary_csv(name, tmp_path):
    """The committed report's tables, comparisons and answer, made again from its summary.csv alone (every value
    the study reads is a column of it, those of the runs' history too), are the committed text to the character
    (the figures need the run dirs)."""
    folder = REPO / "docs" / "studies" / name  # e.g. depth_tuned_fashion_mnist: the study its report names
    table = read_summary(folder / "summary.csv")
    spec = spec_of(load_config([f"+study={(folder / 'report.md').read_text().splitlines()[0].split()[-1]}"]))
    if (folder / "nuisance" / "summary.csv").is_file():  # a tuned study's trials
        (tmp_path / "nuisance").mkdir()
        shutil.copy(folder / "nuisance" / "summary.csv", tmp_path / "nuisance")
    missing = [m for m in values_of(spec) if m not in table and job_value(Job.from_row(table.iloc[0]), m) is None]
    assert not missing, f"{name}/summary.csv lacks values its report reads: {', '.join(missing)}; re-run the study"
    write_report(tmp_path, spec, table)

    def body(report: Path) -> list[str]:
        return [line for line in report.read_text().split("## Results")[1].splitlines() if line and line[0] != "!"]
    assert body(tmp_path / "report.md") == body(folder / "report.md")
