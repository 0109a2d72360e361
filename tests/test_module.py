"""Classifier: metrics against hand-computed values, normalisation inside the model, and what it
builds from configs (and refuses to build)."""

import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mnist_lab import MNISTDataModule, model_config
from mnist_lab.errors import ConfigError
from mnist_lab.evaluate import predict
from mnist_lab.metrics import error_analysis
from mnist_lab.module import Classifier
from mnist_lab.suite import EvaluationSuite


class LogitsFromPixels(nn.Module):
    """A 'network' whose logits are the first 4 pixels of the input: the test chooses the predictions."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x.flatten(1)[:, :4] + 0 * self.unused


class Pixels(LogitsFromPixels):
    """All pixels as 'logits': the test sees exactly what the network is given."""

    def forward(self, x):
        return x.flatten(1) + 0 * self.unused


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
    # the evaluation suite reads the same test (one inference path): the same figures, and its confusion
    # matrix from the logits the module returned; Trainer.predict gives those logits too
    suite = EvaluationSuite(full=False)
    L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[suite]).test(module, dataloaders=batches, verbose=False)
    assert {k: suite.result[k] for k in result} == pytest.approx(result, abs=1e-6)
    expected_cm = [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 2, 0], [0, 0, 0, 1]]
    assert suite.result["confusion"] == expected_cm and suite.result["n_test"] == 8
    assert error_analysis(predict(module, x), y_true)["confusion"] == expected_cm


def test_default_optimizer_is_adam_lr_1e3_and_scheduler_is_wired():
    module = Classifier(nn.Linear(2, 2), num_classes=2)
    opt = module.configure_optimizers()
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["lr"] == 1e-3
    module = Classifier(nn.Linear(2, 2), num_classes=2,
                        scheduler={"scheduler": lambda o: torch.optim.lr_scheduler.StepLR(o, 1), "interval": "step"})
    conf = module.configure_optimizers()
    assert isinstance(conf["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)
    assert conf["lr_scheduler"]["interval"] == "step"


def test_the_model_takes_unit_images_and_standardises_with_the_fitted_datamodules_statistics(synthetic_root):
    dm = MNISTDataModule(root=synthetic_root)
    model = Classifier(Pixels())
    trainer = L.Trainer(max_epochs=1, limit_train_batches=0, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, dm)  # no step: only the setup hooks run
    assert (float(model.mean), float(model.std)) == pytest.approx((dm.mean, dm.std), rel=1e-6)
    assert 0.1 < dm.mean < 0.2 and dm.std > 0.15  # not the 0 / 1 the model starts with
    x = dm.splits["train"][0][:64].float().unsqueeze(1) / 255
    assert torch.allclose(model(x), ((x - dm.mean) / dm.std).flatten(1), atol=1e-5)
    assert set(model.state_dict()) == {"mean", "std", "net.unused"}  # so every checkpoint carries them


def test_a_config_net_is_built_and_saved_as_plain_data():
    model = Classifier(model_config("conv2", dropout=0.25), optimizer={"_target_": "torch.optim.SGD",
                                                                       "_partial_": True, "lr": 0.1})
    assert model.net.name == "conv2" and model.net.backbone[6].p == 0.25
    assert model.hparams.net["_target_"] == "mnist_lab.models.convnet.ConvNet" and model.hparams.net["dropout"] == 0.25
    opt = model.configure_optimizers()
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["lr"] == 0.1
    # an object is used, not saved: its checkpoint could not load with weights_only=True
    assert "net" not in Classifier(nn.Linear(784, 10)).hparams


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"net": {"_target_": "subprocess.Popen", "args": ["true"]}}, "model._target_=subprocess.Popen is not a torch.nn"),
    ({"net": {"_target_": "nowhere.Net"}}, "model._target_=nowhere.Net cannot be imported"),
    ({"net": {"_target_": "torch.nn.Sequential", "_args_": [{"_target_": "os.system", "_args_": ["true"]}]}},
     r"model._args_\[0\]._target_=os.system is not a torch.nn"),
    ({"net": {"_target_": "torch.nn.Linear", "in_features": 2, "out_features": 2},
      "optimizer": {"_target_": "os.system", "_partial_": True}},
     "optimizer._target_=os.system is not a torch.optim"),
    ({"net": {"_target_": "torch.nn.Linear", "in_features": 2, "out_features": 2},
      "scheduler": {"scheduler": {"_target_": "os.system", "_partial_": True}, "interval": "epoch"}},
     "scheduler._target_=os.system is not a torch.optim.lr_scheduler.LRScheduler or torch.optim.lr_scheduler.Red"),
])
def test_configs_build_only_modules_optimizers_and_schedulers(kwargs, message):
    """A checkpoint's configs come from a file anyone can write: nothing else is ever called."""
    with pytest.raises(ConfigError, match=message):
        Classifier(**kwargs)


def test_an_impossible_learning_rate_is_a_config_error_before_training():
    model = Classifier(nn.Linear(2, 2), optimizer={"_target_": "torch.optim.Adam", "_partial_": True, "lr": -1})
    with pytest.raises(ConfigError, match=r"optimizer: Invalid learning rate: -1 \(fix the optimizer"):
        model.configure_optimizers()
