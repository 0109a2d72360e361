"""Classifier metrics against hand-computed values on a small example."""

import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mnist_lab.module import Classifier


class LogitsFromPixels(nn.Module):
    """A 'network' whose logits are the first 4 pixels of the input: the test chooses the predictions."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x.flatten(1)[:, :4] + 0 * self.unused


def test_test_metrics_equal_hand_computed_values():
    y_true = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])
    y_pred = torch.tensor([0, 1, 1, 1, 2, 0, 2, 3])
    x = torch.zeros(8, 1, 28, 28)
    x.view(8, -1)[torch.arange(8), y_pred] = 2.0  # logit 2 for the predicted class, 0 elsewhere
    # two unequal batches (5 and 3 images): the loss must be the mean over images, not over batches
    batches = DataLoader(TensorDataset(x, y_true), batch_sampler=[[0, 1, 2, 3, 4], [5, 6, 7]])

    module = Classifier(LogitsFromPixels(), num_classes=4)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    result = trainer.test(module, dataloaders=batches, verbose=False)[0]

    # by hand: 6 of 8 right
    precision = [1 / 2, 2 / 3, 2 / 2, 1 / 1]  # per predicted class: right / predicted
    recall = [1 / 2, 2 / 2, 2 / 3, 1 / 1]     # per true class: right / true
    f1 = [2 * p * r / (p + r) for p, r in zip(precision, recall, strict=False)]
    right, wrong = math.log(math.e**2 + 3) - 2, math.log(math.e**2 + 3)  # cross-entropy per image
    assert result["test/acc"] == pytest.approx(6 / 8)
    assert result["test/precision_macro"] == pytest.approx(sum(precision) / 4, abs=1e-6)
    assert result["test/recall_macro"] == pytest.approx(sum(recall) / 4, abs=1e-6)
    assert result["test/f1_macro"] == pytest.approx(sum(f1) / 4, abs=1e-6)
    assert result["test/loss"] == pytest.approx((6 * right + 2 * wrong) / 8, abs=1e-6)
    expected_cm = torch.tensor([[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 2, 0], [0, 0, 0, 1]])
    assert torch.equal(module.test_confusion, expected_cm)


def test_default_optimizer_is_adam_lr_1e3_and_scheduler_is_wired():
    module = Classifier(nn.Linear(2, 2), num_classes=2)
    opt = module.configure_optimizers()
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["lr"] == 1e-3
    module = Classifier(nn.Linear(2, 2), num_classes=2,
                        scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 1), scheduler_interval="step")
    conf = module.configure_optimizers()
    assert isinstance(conf["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)
    assert conf["lr_scheduler"]["interval"] == "step"
