"""Hydra multirun sweeps and their summary: named job dirs, summary table, plots, failures, launchers."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import QUIET, cli
from omegaconf import OmegaConf

from mnist_lab.results import aggregate, config_label, pareto_front, read_summary
from mnist_lab.sweep import write_summary

FAST = ["trainer.max_epochs=1", "trainer.limit_train_batches=3", "plots=false"]


def multirun(args, data_root, sweep_dir, tmp_path):
    """``python -m mnist_lab.train ARGS hydra.sweep.dir=SWEEP_DIR``, through its main() in this process."""
    return cli("mnist_lab.train", *args, f"hydra.sweep.dir={sweep_dir}", "trainer.enable_progress_bar=false",
               data_root=data_root, cwd=tmp_path)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_2x2_grid_gives_4_named_job_dirs_a_summary_and_plots(synthetic_root, tmp_path):
    sweep = tmp_path / "sweep"
    proc = multirun(["-m", "model.depth=1,2", "model.batchnorm=false,true", *FAST], synthetic_root, sweep, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    # short names: the job number and the overrides with short keys, cut (and a hash added) beyond 48 characters
    assert [j[:11] for j in jobs] == ["000_depth=1", "001_depth=1", "002_depth=2", "003_depth=2"]
    assert all(len(j) <= 52 for j in jobs) and jobs[0] != jobs[1]
    records = [list(OmegaConf.load(sweep / j / ".hydra" / "overrides.yaml")) for j in jobs]  # the full overrides
    assert [r[:2] for r in records] == [[f"model.depth={d}", f"model.batchnorm={bn}"]
                                        for d in (1, 2) for bn in ("False", "True")]
    rows = read_csv(sweep / "summary.csv")
    assert len(rows) == 4 and {r["status"] for r in rows} == {"completed"}
    by_config = {(r["model.depth"], r["model.batchnorm"]): r for r in rows}
    assert by_config[("2", "true")]["params_trainable"] == "225482"
    assert by_config[("1", "false")]["params_trainable"] == "693962"
    assert all(float(r["test/acc"]) > 0.1 and r["epochs"] == "1" for r in rows)
    assert all(0 <= float(r["robustness/mean"]) <= 1 and r["test/ece"] for r in rows)  # the evaluation suite ran
    for png in ("acc_vs_params.png", "val_curves.png", "train_val_gap.png", "heatmap.png", "robustness.png"):
        assert (sweep / png).stat().st_size > 10_000
    md = (sweep / "summary.md").read_text()
    assert "4 jobs: 4 completed, 0 failed" in md and "| batchnorm=true, depth=2 | 1 |" in md
    assert "Pareto front (no configuration is more accurate with as few trainable parameters): " in md
    assert {r["architecture"] for r in read_csv(sweep / "summary.csv")} == {"ConvNet"}
    assert f"summary: {sweep / 'summary.md'} (4 jobs)" in proc.stdout
    assert not any("enable_progress_bar" in j or "progress" in r for j, r in zip(jobs, rows))  # display only
    assert "enable_progress_bar" not in md
    # summary.csv alone gives summary.md back, every figure of it
    again = tmp_path / "again" / sweep.name
    again.mkdir(parents=True)
    write_summary(again, table=read_summary(sweep / "summary.csv"))
    assert (again / "summary.md").read_text() == md


def test_a_failing_job_does_not_stop_the_sweep_and_is_listed(synthetic_root, tmp_path):
    sweep = tmp_path / "sweep"
    proc = multirun(["-m", "model.dropout=0.0,1.5,0.25", *FAST], synthetic_root, sweep, tmp_path)
    assert proc.returncode == 1  # the sweep reports its failure, after every job ran and the summary was written
    rows = {r["model.dropout"]: r for r in read_csv(sweep / "summary.csv")}
    assert rows["0.0"]["status"] == rows["0.25"]["status"] == "completed"
    assert rows["1.5"]["status"] == "failed"
    assert "ConfigError: model.dropout=1.5 is outside [0, 1)" in rows["1.5"]["error"]
    md = (sweep / "summary.md").read_text()
    assert "3 jobs: 2 completed, 1 failed" in md and "## Jobs that did not complete" in md
    assert "model.dropout=1.5" in md and "1 of 3 jobs did not complete" in proc.stderr


def test_aug_false_true_sweeps(synthetic_root, tmp_path):
    sweep = tmp_path / "sweep"
    proc = multirun(["-m", "+aug=false,true", *FAST], synthetic_root, sweep, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    augs = {r["aug"]: json.loads((sweep / r["job"] / "metrics.json").read_text())["aug"]
            for r in read_csv(sweep / "summary.csv")}
    assert augs == {"false": False, "true": True}


def test_named_sweep_runs_as_multirun_and_the_command_line_narrows_it(synthetic_root, tmp_path):
    sweep = tmp_path / "sweep"
    proc = multirun(["+sweep=aug", "seed=0", *FAST], synthetic_root, sweep, tmp_path)  # no -m needed
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_csv(sweep / "summary.csv")
    assert sorted((r["aug"], r["seed"]) for r in rows) == [("false", "0"), ("true", "0")]
    assert all("sweep=" not in r["job"] for r in rows)  # the sweep's name is not a factor


def test_parallel_cpu_launcher_runs_jobs_in_two_processes(synthetic_root, tmp_path):
    sweep = tmp_path / "sweep"
    proc = multirun(["-m", "+launcher=cpu_parallel", "model=fc,conv1", *FAST], synthetic_root, sweep, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    rows = read_csv(sweep / "summary.csv")
    assert sorted(r["params_trainable"] for r in rows) == ["101770", "693962"]
    assert all("launcher" not in r["job"] for r in rows)


def test_mean_and_std_over_seeds_match_a_hand_computation():
    def row(dropout, seed, acc, params=100, status="completed"):
        return {"job": f"{dropout}_{seed}", "status": status, "architecture": "ConvNet", "model.dropout": dropout,
                "seed": seed, "params_trainable": params, "test/acc": acc, "gap": None if acc is None else acc - 0.9}

    table = pd.DataFrame([row("0.0", "0", 0.97), row("0.0", "1", 0.98), row("0.0", "2", 0.99), row("0.5", "0", 0.95),
                          row("0.5", "1", None, status="failed")])
    groups = aggregate(table).set_index("label")
    assert list(groups.index) == ["dropout=0.0", "dropout=0.5"]
    zero = groups.loc["dropout=0.0"]
    assert (zero["n"], zero["test/acc n"]) == (3, 3)
    assert zero["test/acc"] == pytest.approx(0.98) and zero["test/acc std"] == pytest.approx(0.01)  # sqrt(2e-4 / 2)
    half = groups.loc["dropout=0.5"]
    assert (half["test/acc"], half["test/acc std"], half["n"]) == (0.95, 0.0, 1)  # one value: no spread
    assert zero["gap"] == pytest.approx(0.08)
    m = 7 / 3
    spread = aggregate(pd.DataFrame([row("0", str(i), v) for i, v in enumerate((1.0, 2.0, 4.0))]))
    assert spread.loc[0, "test/acc std"] == pytest.approx((((1 - m) ** 2 + (2 - m) ** 2 + (4 - m) ** 2) / 2) ** 0.5)
    assert config_label({"model.batchnorm": "true", "optimizer.lr": "0.01"}) == "batchnorm=true, lr=0.01"


def test_summary_of_an_unfinished_sweep_lists_the_running_job(tmp_path):
    job = tmp_path / "model=fc"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("- model=fc\n")
    (job / ".hydra" / "hydra.yaml").write_text("hydra: {job: {config: {override_dirname: {exclude_keys: []}}}}\n")
    result = write_summary(tmp_path)
    assert result["table"]["status"].tolist() == ["incomplete"] and result["failed"] == ["model=fc"]
    assert "no metrics.json: the job was killed or is still running" in (tmp_path / "summary.md").read_text()
    with pytest.raises(FileNotFoundError, match="no Hydra job dirs"):
        write_summary(tmp_path / "empty")


@pytest.mark.parametrize(("launcher", "target"), [
    ("cpu_parallel", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
    ("slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
])
def test_launcher_configs_compose_with_their_hydra_plugins(launcher, target):
    from hydra import compose, initialize_config_dir

    from mnist_lab.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"+launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == target
    if launcher == "cpu_parallel":
        assert cfg.hydra.launcher.n_jobs * cfg.threads <= 2  # fits the 2-core machines this runs on
    else:
        assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.timeout_min == 60


def test_the_pareto_front_keeps_each_configuration_no_smaller_one_beats():
    groups = pd.DataFrame({"label": list("abcdef"), "params_trainable": [100, 200, 150, 300, 400, 100],
                           "test/acc": [0.90, 0.95, 0.89, 0.94, 0.97, 0.91]})
    assert pareto_front(groups)["label"].tolist() == ["f", "b", "e"]  # a ties f's size and is worse


def test_the_frontier_sweep_runs_families_side_by_side(synthetic_root, tmp_path):
    """+sweep=frontier narrowed on the command line to two families, one seed, a few steps."""
    sweep = tmp_path / "sweep"
    proc = multirun(["+sweep=frontier", "model=fc,depthwise_3k", "seed=0", *FAST], synthetic_root, sweep, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["model"]: r for r in read_csv(sweep / "summary.csv")}
    assert {k: (v["architecture"], v["params_trainable"]) for k, v in rows.items()} == {
        "fc": ("ConvNet", "101770"), "depthwise_3k": ("DepthwiseNet", "2858")}
    metrics = json.loads((sweep / rows["fc"]["job"] / "metrics.json").read_text())
    assert (metrics["split"], metrics["batch_size"], metrics["n_test"]) == ("official", 128, 100)
    assert "Pareto front" in (sweep / "summary.md").read_text()


def test_a_killed_sweep_resumes_where_it_stopped_and_ends_as_the_uninterrupted_one(synthetic_root, tmp_path):
    """4 deterministic jobs; SIGTERM in the middle of job 3 (job 2: the environment names it, so both
    sweeps have the same overrides). `-m resume=<sweep dir>` skips jobs 1-2 (their files untouched),
    continues job 3 from its last checkpoint and runs job 4: the summary is the uninterrupted sweep's."""
    args = ["-m", "model=fc", "seed=0,1,2,3", "trainer.max_epochs=2", "trainer.limit_train_batches=3",
            "trainer.deterministic=true", "eval.full=false", "plots=false",
            *[f"+callbacks.kill.{k}={v}" for k, v in (("_target_", "probes.SignalAtJob"), ("epoch", 1), ("batch", 1),
                                                      ("signal", "SIGTERM"))]]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert multirun(args, synthetic_root, whole, tmp_path).returncode == 0
    proc = cli("mnist_lab.train", *args, f"hydra.sweep.dir={killed}", data_root=synthetic_root, cwd=tmp_path,
               env={"MNIST_LAB_SIGNAL_JOB": "2"})
    assert proc.returncode == 143 and f"continue with: python -m mnist_lab.train -m resume={killed}" in proc.stderr
    jobs = sorted(p for p in killed.iterdir() if p.is_dir())
    assert [json.loads((j / "metrics.json").read_text())["status"] for j in jobs] == ["completed", "completed",
                                                                                      "interrupted"]
    done = {f: f.read_bytes() for j in jobs[:2] for f in j.rglob("*") if f.is_file() and f.name != "train.log"}

    proc = cli("mnist_lab.train", "-m", f"resume={killed}", data_root=synthetic_root, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("completed before, skipped") == 2
    assert f"summary: {killed / 'summary.md'} (4 jobs)" in proc.stdout
    assert {f: f.read_bytes() for f in done} == done  # jobs 1-2 were not retrained: every file as it was

    def table(path):
        return [{k: v for k, v in r.items() if k != "train_seconds"} for r in read_csv(path / "summary.csv")]
    assert table(killed) == table(whole)  # job names, every figure, every status: the uninterrupted sweep's
    proc = cli("mnist_lab.train", "-m", f"resume={killed}", "seed=9", data_root=synthetic_root, cwd=tmp_path)
    assert proc.returncode == 2 and "drop the other overrides (seed=9)" in proc.stderr


def test_the_submitit_launcher_runs_a_sweep_through_its_executor(synthetic_root, tmp_path):
    """+launcher=submitit_local: the code path of +launcher=slurm (pickled jobs, submitit's executor),
    with local processes instead of cluster jobs."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    proc = multirun(["-m", "+launcher=submitit_local", "model=fc", "seed=0,1", *FAST, "eval.full=false"],
                    synthetic_root, sweep, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_csv(sweep / "summary.csv")
    assert [(r["seed"], r["status"]) for r in rows] == [("0", "completed"), ("1", "completed")]
    logs = sorted(p.name for p in (sweep / ".submitit").rglob("*_log.out"))
    assert len(logs) == 2  # two jobs, each through submitit's executor in a process of its own


def test_job_dir_names_are_short_unique_and_readable_whatever_the_overrides():
    from mnist_lab.config import job_dir

    rest = ["model=conv2", "model.depth=2", "model.dropout=0.123456789012345", "model.width=0.75", "data.batch_size=64",
            "data.eval_batch_size=500", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "+aug=true", "seed=3",
            "data.root=/some/long/path/to/the/data", "+sweep=depth"]  # 12 overrides, and the swept one
    lrs = ["optimizer.lr=0.0012345678901234", "optimizer.lr=0.0012345678909999", "optimizer.lr=0.009"]
    names = [job_dir(i, [lr, *rest], exclude=["sweep"]) for i, lr in enumerate(lrs)]
    assert [n[:16] for n in names] == ["000_lr=0.001235,", "001_lr=0.001235,", "002_lr=0.009,mod"]
    assert len(set(names)) == 3 and all(len(n) <= 52 for n in names) and "sweep" not in "".join(names)
    assert job_dir(3, ["model.depth=2", "seed=0"]) == "003_depth=2,seed=0"  # short enough: as it is
    # a search's jobs (each worker numbers its own from 0): no number; a hash of the exact values keeps
    # apart two trials that agree to 4 digits, and gives a trial enqueued again its own dir back
    a, b = job_dir(None, lrs[:1]), job_dir(None, lrs[1:2])
    assert a != b and a.startswith("lr=0.001235_") and a == job_dir(None, lrs[:1])


def live_descendants(pid: int) -> set[int]:
    """The processes below ``pid`` (children, their children, ...), from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads processes from /proc")
def test_a_parallel_sweep_stopped_by_sigterm_leaves_no_process_behind(synthetic_root, tmp_path):
    """+launcher=cpu_parallel, SIGTERM to the sweep's process while both workers train: the workers are
    stopped with it (each job records itself interrupted), the sweep exits 143 with its resume command, and
    no process of the sweep remains (a loky worker once stayed, about 1 GB, for 25 minutes)."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    env = {**os.environ, "MNIST_LAB_DATA": str(synthetic_root), "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mnist_lab.train", "-m", "+launcher=cpu_parallel", "model=fc",
                             "seed=0,1", "trainer.max_epochs=500", "callbacks.early_stopping=null", "eval.full=false",
                             "plots=false", *QUIET, f"hydra.sweep.dir={sweep}"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while len(list(sweep.glob("*/checkpoints/last.ckpt"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # both jobs train (each has finished an epoch)
    workers = live_descendants(proc.pid)
    assert len(workers) >= 2
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert f"error: stopped by SIGTERM; continue with: python -m mnist_lab.train -m resume={sweep}" in err
    while workers & live_descendants(1) and time.monotonic() < deadline + 60:
        time.sleep(0.5)
    assert not {w for w in workers if Path(f"/proc/{w}").exists() and "Z" not in
                Path(f"/proc/{w}/stat").read_text().rsplit(")", 1)[1].split()[:1]}
    statuses = [json.loads(p.read_text())["status"] for p in sweep.glob("*/metrics.json")]
    assert statuses == ["interrupted", "interrupted"]
