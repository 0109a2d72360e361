"""steps_per_execution=K runs K optimizer steps per Lightning step with the semantics of K=1: on the CPU with
trainer.deterministic=true the runs are identical (metrics.json but timings, metrics.csv, every weight), and
every option Lightning counts in training steps counts mini-batches whatever K."""

import csv
import json

import pytest
import torch
from conftest import QUIET

from mnist_lab import load_config, train
from mnist_lab.data import BatchIndexSampler, InMemoryBatches
from mnist_lab.errors import ConfigError, RunInterrupted, TrainingDiverged

TIMINGS = {"train_seconds", "seconds_per_epoch", "run_dir", "steps_per_execution"}
# fc with dropout and augmentation; 800 training images
BASE = ["model=fc", "model.dropout=0.2", "+aug=true", "trainer.deterministic=true", "callbacks.early_stopping=null",
        "eval.full=false", "plots=false", *QUIET]
# the options Lightning counts in training steps, at batch 8 (100 mini-batches an epoch): 64 an epoch, a
# validation every 32 and the batch loss logged every 16
COUNTED = ["data.batch_size=8", "trainer.max_epochs=2", "trainer.limit_train_batches=64",
           "+trainer.val_check_interval=32", "trainer.log_every_n_steps=16", "module.log_train_steps=true",
           "+callbacks.steps._target_=probes.StepIndices", "+callbacks.clock._target_=probes.FitClock"]


def run(synthetic_root, path, k, *extra: str) -> dict:
    """Train; returns metrics.json (but timings), metrics.csv's rows, the last checkpoint and what the
    hooks saw after each training step."""
    metrics = train(load_config([f"steps_per_execution={k}", *BASE, f"data.root={synthetic_root}", *extra]), path)
    with open(path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    steps = path / "step_indices.json"
    return {"metrics": {k: v for k, v in metrics.items() if k not in TIMINGS}, "k": metrics["steps_per_execution"],
            "rows": rows, "ckpt": torch.load(path / "checkpoints" / "last.ckpt", weights_only=True),
            "steps": json.loads(steps.read_text()) if steps.exists() else None}


def assert_same_training(a: dict, b: dict) -> None:
    assert a["metrics"] == b["metrics"]
    assert a["rows"] == b["rows"]  # every logged value at the same step, validations included
    assert a["ckpt"]["global_step"] == b["ckpt"]["global_step"]
    assert a["ckpt"]["state_dict"].keys() == b["ckpt"]["state_dict"].keys()
    assert all(torch.equal(a["ckpt"]["state_dict"][k], b["ckpt"]["state_dict"][k]) for k in a["ckpt"]["state_dict"])


@pytest.mark.parametrize("schedule", [
    ["scheduler=onecycle", "+trainer.gradient_clip_val=0.05"],        # per-step LR, gradients clipped
    ["scheduler=cosine", "optimizer=sgd", "optimizer.lr=0.05"],       # per-epoch LR, momentum
    ["scheduler=plateau", "scheduler.scheduler.patience=0", "optimizer.lr=0.01"],  # on val/loss
], ids=["onecycle_clip", "cosine_sgd", "plateau"])
def test_k8_trains_exactly_as_k1(schedule, synthetic_root, tmp_path):
    # 25 steps an epoch at batch 32, so K=8 ends each epoch with a group of one
    r1, r8 = (run(synthetic_root, tmp_path / f"k{k}", k, "trainer.max_epochs=3", *schedule) for k in (1, 8))
    assert (r1["k"], r8["k"]) == (1, 8)
    assert_same_training(r1, r8)
    assert r8["ckpt"]["global_step"] == 75  # optimizer steps, not Lightning steps
    sched1, sched8 = r1["ckpt"]["lr_schedulers"][0], r8["ckpt"]["lr_schedulers"][0]
    if "plateau" not in schedule[0]:
        assert sched8["last_epoch"] == sched1["last_epoch"] and sched8["_last_lr"] == sched1["_last_lr"]
    else:  # Lightning steps ReduceLROnPlateau after writing last.ckpt, K=8 before it (docs/speed.md)
        assert sched8["last_epoch"] == sched1["last_epoch"] + 1


def test_options_counted_in_steps_count_mini_batches_for_k1_auto_and_k8(synthetic_root, tmp_path):
    runs = {k: run(synthetic_root, tmp_path / str(k), k, *COUNTED) for k in (1, "auto", 8)}
    # train_seconds is the fit's time (Trainer.test restores the tested checkpoint's Timer: not counted twice)
    fit_seconds = float((tmp_path / "8" / "fit_seconds.txt").read_text())
    assert json.loads((tmp_path / "8" / "metrics.json").read_text())["train_seconds"] == pytest.approx(fit_seconds,
                                                                                                       abs=0.05)
    assert [runs[k]["k"] for k in runs] == [1, 32, 8]  # auto at batch 8 on the CPU: 2048 images a step, at most 32
    for k in ("auto", 8):
        assert_same_training(runs[1], runs[k])
    rows = runs[1]["rows"]
    assert [r["step"] for r in rows if r["val/loss"]] == ["31", "63", "95", "127"]  # 2 validations an epoch
    assert [r["step"] for r in rows if r["train/loss_step"]] == [str(s) for s in range(15, 128, 16)]
    assert runs[8]["ckpt"]["global_step"] == 128  # 64 mini-batches an epoch, not 64 groups of 8
    # a step's hooks see the index of its group's first mini-batch, and global_step in mini-batches
    assert runs[8]["steps"] == [[e, i, s + 7] for e, i, s in runs[1]["steps"] if i % 8 == 0]
    assert runs["auto"]["steps"] == [[e, i, s + 15] for e, i, s in runs[1]["steps"] if i % 16 == 0]  # cut at 16s


def test_a_group_ends_where_a_counted_option_acts_and_a_fraction_limit_cuts_the_last_short(synthetic_root, tmp_path):
    # 55 mini-batches an epoch (0.55 of 100): neither 8 nor the logging interval divides it, so the
    # epoch-wide validation every 24 and the run-wide logging every 20 fall inside groups of 8
    counted = [*COUNTED[:2], "trainer.limit_train_batches=0.55", "+trainer.val_check_interval=24",
               "trainer.log_every_n_steps=20", *COUNTED[5:]]
    r1, r8 = (run(synthetic_root, tmp_path / str(k), k, *counted) for k in (1, 8))
    assert_same_training(r1, r8)
    assert [r["step"] for r in r1["rows"] if r["train/loss_step"]] == [str(s) for s in range(19, 110, 20)]
    assert [i for e, i, _ in r8["steps"] if e == 1] == [0, 5, 13, 21, 24, 25, 33, 41, 45, 48]


def test_a_run_killed_inside_a_group_resumes_from_a_mid_epoch_checkpoint_as_k1_does(synthetic_root, tmp_path):
    """A checkpoint every 24 steps (inside epoch 1's groups of 8, 25 steps an epoch), SIGTERM at mini-batch
    5 of epoch 2 (inside a group), resumed from the step-48 checkpoint: K=8 ends where K=1 ends."""
    every = ["+callbacks.every._target_=lightning.pytorch.callbacks.ModelCheckpoint",
             "+callbacks.every.every_n_train_steps=24", "+callbacks.every.save_top_k=-1",
             "+callbacks.every.dirpath=${run_dir}/every", "+callbacks.every.filename='{step}'", "trainer.max_epochs=3"]
    kill = ["+callbacks.kill._target_=probes.SignalAt", "+callbacks.kill.epoch=2", "+callbacks.kill.batch=5",
            "+callbacks.kill.signal=SIGTERM"]
    resumed = {}
    for k in (1, 8):
        path = tmp_path / str(k)
        cfg = load_config([f"steps_per_execution={k}", *BASE, f"data.root={synthetic_root}", *every, *kill])
        with pytest.raises(RunInterrupted):
            train(cfg, path)
        assert sorted(p.name for p in (path / "every").iterdir()) == ["step=24.ckpt", "step=48.ckpt"]
        train(cfg, path, ckpt_path=path / "every" / "step=48.ckpt")
        resumed[k] = run_summary = {key: v for key, v in json.loads((path / "metrics.json").read_text()).items()
                                    if key not in TIMINGS}
        assert run_summary["status"] == "completed"
    assert resumed[1] == resumed[8]
    w1, w8 = (torch.load(tmp_path / str(k) / "checkpoints" / "last.ckpt", weights_only=True) for k in (1, 8))
    assert w1["global_step"] == w8["global_step"] == 75
    assert all(torch.equal(w1["state_dict"][k], w8["state_dict"][k]) for k in w1["state_dict"])


def test_groups_hold_the_same_batches_in_the_same_order():
    images, labels = torch.randint(0, 256, (100, 28, 28), dtype=torch.uint8), torch.arange(100)
    flat = [y for _, y in InMemoryBatches(images, labels, BatchIndexSampler(100, 16, shuffle=True, seed=3))]
    grouped = InMemoryBatches(images, labels, BatchIndexSampler(100, 16, shuffle=True, seed=3))
    grouped.group_ends = [3, 4, 6]  # the pass stops after 6 of the 7 batches
    groups = list(grouped)
    assert (len(grouped), [len(g) for g in groups]) == (7, [3, 1, 2])
    assert all(torch.equal(a, b) for a, (_, b) in zip(flat[:6], [batch for g in groups for batch in g], strict=True))


def test_auto_is_1_beside_swa_and_k_above_1_is_refused_there(synthetic_root, tmp_path):
    swa = ["+callbacks.swa._target_=lightning.pytorch.callbacks.StochasticWeightAveraging",
           "+callbacks.swa.swa_lrs=0.0005", "trainer.max_epochs=2", "trainer.limit_train_batches=5"]
    assert run(synthetic_root, tmp_path / "auto", "auto", *swa)["k"] == 1
    for extra, message in ((swa, "steps_per_execution=8 cannot run with the StochasticWeightAveraging callback"),
                           (["+trainer.accumulate_grad_batches=2"], "steps_per_execution=8 cannot run with gradient "
                            r"accumulation \(trainer.accumulate_grad_batches=2\); use steps_per_execution=1")):
        cfg = load_config(["steps_per_execution=8", *BASE, f"data.root={synthetic_root}", *extra])
        with pytest.raises(ConfigError, match=message):
            train(cfg, tmp_path / f"bad{len(extra)}")


def test_divergence_is_caught_inside_a_group_and_bad_values_are_refused(synthetic_root, tmp_path):
    cfg = load_config(["steps_per_execution=8", "model=fc", "optimizer.lr=1e6", f"data.root={synthetic_root}",
                       "plots=false", *QUIET])
    with pytest.raises(TrainingDiverged, match="training diverged: the training loss became"):
        train(cfg, tmp_path / "diverged")
    cfg = load_config(["steps_per_execution=0", f"data.root={synthetic_root}", *QUIET])
    with pytest.raises(ConfigError, match="steps_per_execution=0 must be a positive integer, e.g. 8, or auto"):
        train(cfg, tmp_path / "bad0")


def test_the_one_lightning_internal_is_where_mnist_lab_reads_it(synthetic_root, tmp_path):
    """mnist_lab/lightning_internals.py: the fit loop's count of training steps, which Lightning exposes no
    public way to set. A release that moves it fails here, by name, before any equivalence test does."""
    import lightning as L

    from mnist_lab import Classifier, MNISTDataModule, build_model
    from mnist_lab.lightning_internals import steps_counted
    from mnist_lab.steps import every_n_train_steps

    trainer = L.Trainer(max_steps=7, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    try:
        trainer.fit(Classifier(build_model("fc"), steps_per_execution=1), MNISTDataModule(root=synthetic_root))
        counted = steps_counted(trainer)
    except AttributeError as e:
        pytest.fail(f"lightning {L.__version__} moved the fit loop's step count ({e}): update "
                    "mnist_lab/lightning_internals.py and the lightning bound in pyproject.toml")
    assert counted == trainer.global_step == 7  # K = 1: one training step per optimizer step
    # the public routes it stands beside: a checkpoint's every_n_train_steps from its state_key
    from datetime import timedelta

    from lightning.pytorch.callbacks import ModelCheckpoint
    assert every_n_train_steps(ModelCheckpoint(every_n_train_steps=24)) == 24
    assert every_n_train_steps(ModelCheckpoint(train_time_interval=timedelta(seconds=5))) == 0
