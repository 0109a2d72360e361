"""The learning-dynamics callback (issue 23): every logged quantity against a hand computation on a tiny
net, the same records at any steps_per_execution, and its plot in the run dir."""

import csv

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger
from torch import nn

from mnist_lab import Classifier, MNISTDataModule, load_config, train
from mnist_lab.callbacks import Dynamics
from mnist_lab.errors import ConfigError

QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


class Records(Logger):
    """What the callback hands to the loggers: ``(step, metrics)`` per call."""

    def __init__(self):
        super().__init__()
        self.rows = []

    name, version = "records", 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        if any(k.startswith("dynamics/") for k in metrics):
            self.rows.append((step, dict(metrics)))


class Batches(L.Callback):
    """The mini-batch and the weights each optimizer step starts from (K = 1)."""

    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((batch, {k: v.detach().clone() for k, v in pl_module.net.state_dict().items()}))


def test_every_quantity_matches_a_hand_computation_for_sgd_steps(synthetic_root):
    """Two-layer net, plain SGD at lr 0.1 (an update is ``-lr * grad``), a record every 2 steps: the loss
    and accuracy of the window's two mini-batches, the gradient norms of the recorded step (global and per
    layer), the weight norms before it, the update ratio ``lr ||g|| / ||w||`` and the learning rate."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10))
    model = Classifier(net, optimizer=lambda p: torch.optim.SGD(p, lr=0.1), steps_per_execution=1)
    records, batches = Records(), Batches()
    trainer = L.Trainer(max_steps=4, callbacks=[batches, Dynamics(every_n_steps=2)], logger=records,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=MNISTDataModule(root=synthetic_root, batch_size=50))
    assert [step for step, _ in records.rows] == [1, 3]  # 0-based index of the 2nd and 4th optimizer step
    for (_, logged), window in zip(records.rows, (batches.seen[0:2], batches.seen[2:4])):
        losses, correct, n = [], 0, 0
        for (x, y), weights in window:
            net_copy = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10))
            net_copy.load_state_dict(weights)
            logits = net_copy((x - model.mean) / model.std)
            loss = F.cross_entropy(logits, y)
            losses.append(float(loss.detach()) * len(y))
            correct, n = correct + int((logits.argmax(1) == y).sum()), n + len(y)
        loss.backward()  # the recorded step: the window's last mini-batch, at the weights it started from
        layers = {"1": net_copy[1], "3": net_copy[3]}
        grad = {k: torch.cat([m.weight.grad.flatten(), m.bias.grad.flatten()]).norm() for k, m in layers.items()}
        weight = {k: torch.cat([m.weight.flatten(), m.bias.flatten()]).norm() for k, m in layers.items()}
        assert logged["dynamics/train_loss"] == pytest.approx(sum(losses) / n, rel=1e-5)
        assert logged["dynamics/train_acc"] == pytest.approx(correct / n)
        assert logged["dynamics/lr"] == 0.1
        assert logged["dynamics/grad_norm"] == pytest.approx(float(torch.stack(list(grad.values())).norm()), rel=1e-5)
        for k in layers:
            assert logged[f"grad_norm/{k}"] == pytest.approx(float(grad[k]), rel=1e-5)
            assert logged[f"weight_norm/{k}"] == pytest.approx(float(weight[k]), rel=1e-5)
            assert logged[f"update_ratio/{k}"] == pytest.approx(0.1 * float(grad[k] / weight[k]), rel=1e-4)
    with pytest.raises(ConfigError, match="every_n_steps=0 must be a positive integer, e.g. 50 optimizer steps"):
        Dynamics(every_n_steps=0)


class PlainModule(L.LightningModule):  # a LightningModule that is not a Classifier: no train_sums
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_module_without_running_sums_is_refused_before_the_first_step(synthetic_root):
    trainer = L.Trainer(max_steps=2, callbacks=[Dynamics(every_n_steps=1)], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    module = PlainModule()
    before = module.net[1].weight.detach().clone()
    with pytest.raises(ConfigError, match="PlainModule lacks: train through Classifier, or set callbacks.dynamics"):
        trainer.fit(module, datamodule=MNISTDataModule(root=synthetic_root, batch_size=50))
    assert torch.equal(module.net[1].weight, before)  # refused before any optimizer step


def dynamics_rows(run) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if v and (k == "step" or "/" in k and not k.startswith(("val", "train")))}
                for row in csv.DictReader(f) if row.get("dynamics/grad_norm")]


def test_steps_per_execution_records_the_same_values_and_draws_the_plot(synthetic_root, tmp_path):
    """K = 1 and K = 8 with a record every 5 steps (inside the groups of 8, across the epoch's end at 20
    mini-batches): identical rows, so each recorded step is the same optimizer step."""
    runs = {}
    for k in (1, 8):
        cfg = load_config(["model=conv2", f"data.root={synthetic_root}", "trainer.max_epochs=2", "eval.full=false",
                           "trainer.limit_train_batches=23", "trainer.deterministic=true", f"steps_per_execution={k}",
                           "callbacks.dynamics.every_n_steps=5", *QUIET])
        metrics = train(cfg, tmp_path / f"k{k}")
        assert metrics["steps_per_execution"] == k
        runs[k] = dynamics_rows(tmp_path / f"k{k}")
    assert [int(r["step"]) for r in runs[1]] == [4, 9, 14, 19, 24, 29, 34, 39, 44]
    assert runs[1] == runs[8]
    assert {k.split("/")[0] for k in runs[1][0]} == {"step", "dynamics", "grad_norm", "weight_norm", "update_ratio"}
    assert sorted(k for k in runs[1][0] if k.startswith("update_ratio/")) == [
        "update_ratio/backbone.0", "update_ratio/backbone.3", "update_ratio/head.0", "update_ratio/head.2"]
    assert (tmp_path / "k8" / "dynamics.png").stat().st_size > 10_000
    assert not (tmp_path / "k8" / "curves.png").samefile(tmp_path / "k8" / "dynamics.png")
