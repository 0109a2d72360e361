"""steps_per_execution=K runs K optimizer steps per Lightning step with the semantics of K=1: on the CPU with
trainer.deterministic=true the runs are identical (metrics.json but timings, and every weight)."""

import json

import pytest
import torch
from conftest import QUIET

from mnist_lab import load_config, train
from mnist_lab.data import BatchIndexSampler, InMemoryBatches
from mnist_lab.errors import ConfigError, TrainingDiverged

TIMINGS = {"train_seconds", "seconds_per_epoch", "run_dir"}


def run(synthetic_root, path, k: int, *extra: str) -> tuple[dict, dict]:
    # 800 training images at batch 32: 25 steps an epoch, so K=8 ends each epoch with a group of one
    cfg = load_config([f"steps_per_execution={k}", "model=fc", "model.dropout=0.2", "+aug=true", "trainer.max_epochs=3",
                       "trainer.deterministic=true", "callbacks.early_stopping=null", "eval.full=false", "plots=false",
                       f"data.root={synthetic_root}", *extra, *QUIET])
    train(cfg, path)
    metrics = {k: v for k, v in json.loads((path / "metrics.json").read_text()).items() if k not in TIMINGS}
    return metrics, torch.load(path / "checkpoints" / "last.ckpt", weights_only=True)


@pytest.mark.parametrize("schedule", [
    ["scheduler=onecycle", "+trainer.gradient_clip_val=0.05"],        # per-step LR, gradients clipped
    ["scheduler=cosine", "optimizer=sgd", "optimizer.lr=0.05"],       # per-epoch LR, momentum
    ["scheduler=plateau", "scheduler.scheduler.patience=0", "optimizer.lr=0.01"],  # on val/loss
], ids=["onecycle_clip", "cosine_sgd", "plateau"])
def test_k8_trains_exactly_as_k1(schedule, synthetic_root, tmp_path):
    m1, ckpt1 = run(synthetic_root, tmp_path / "k1", 1, *schedule)
    m8, ckpt8 = run(synthetic_root, tmp_path / "k8", 8, *schedule)
    assert m8 == m1
    assert ckpt8["global_step"] == ckpt1["global_step"] == 75  # optimizer steps, not Lightning steps
    assert ckpt8["state_dict"].keys() == ckpt1["state_dict"].keys()
    assert all(torch.equal(ckpt8["state_dict"][k], ckpt1["state_dict"][k]) for k in ckpt1["state_dict"])
    sched1, sched8 = ckpt1["lr_schedulers"][0], ckpt8["lr_schedulers"][0]
    if "plateau" not in schedule[0]:
        assert sched8["last_epoch"] == sched1["last_epoch"] and sched8["_last_lr"] == sched1["_last_lr"]
    else:  # Lightning steps ReduceLROnPlateau after writing last.ckpt, K=8 before it (docs/speed.md)
        assert sched8["last_epoch"] == sched1["last_epoch"] + 1


def test_groups_hold_the_same_batches_in_the_same_order():
    images, labels = torch.randint(0, 256, (100, 28, 28), dtype=torch.uint8), torch.arange(100)
    flat = [y for _, y in InMemoryBatches(images, labels, BatchIndexSampler(100, 16, shuffle=True, seed=3))]
    grouped = InMemoryBatches(images, labels, BatchIndexSampler(100, 16, shuffle=True, seed=3), group=3)
    groups = list(grouped)
    assert (len(grouped), grouped.minibatches, [len(g) for g in groups]) == (3, 7, [3, 3, 1])
    assert all(torch.equal(a, b) for a, (_, b) in zip(flat, [batch for g in groups for batch in g], strict=True))


def test_divergence_is_caught_inside_a_group_and_bad_values_are_refused(synthetic_root, tmp_path):
    cfg = load_config(["steps_per_execution=8", "model=fc", "optimizer.lr=1e6", f"data.root={synthetic_root}",
                       "plots=false", *QUIET])
    with pytest.raises(TrainingDiverged, match="training diverged: the training loss became"):
        train(cfg, tmp_path / "diverged")
    for value, message in (("0", "steps_per_execution=0 must be a positive integer"),
                           ("8 +trainer.accumulate_grad_batches=2", "Lightning refuses these settings: .*"
                                                                     "accumulation is not supported for manual")):
        cfg = load_config([f"steps_per_execution={value.split()[0]}", *value.split()[1:],
                           f"data.root={synthetic_root}", *QUIET])
        with pytest.raises(ConfigError, match=message):
            train(cfg, tmp_path / f"bad{value[0]}")
