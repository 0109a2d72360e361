"""The records' levers (issue 22), each pinned by hand: label smoothing (training loss only), the EMA of
the weights (what is averaged, and that the average is what is tested), test-time augmentation (exact
pixel shifts, chosen on validation) and the depthwise family's kernel size."""

import json

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mnist_lab.evaluate as evaluate_module
from mnist_lab import Classifier, MNISTDataModule, load_config, train
from mnist_lab.callbacks import EMA
from mnist_lab.errors import ConfigError
from mnist_lab.evaluate import TTA_SHIFTS, evaluate_ensemble, predict
from mnist_lab.models import count_parameters
from mnist_lab.models.depthwise import DepthwiseNet, SharedBlock
from mnist_lab.transforms import shift_pixels, to_unit

QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "plots=false"]


def tiny_classifier(**kw) -> Classifier:
    torch.manual_seed(0)
    return Classifier(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), **kw)


def test_label_smoothing_changes_the_training_loss_alone():
    """Training: ``-((1 - e) log p_y + e / C sum_k log p_k)``, by hand (Szegedy et al. 2016); validation's
    loss (which picks the checkpoint) stays the plain cross-entropy."""
    model = tiny_classifier(label_smoothing=0.1)
    x, y = torch.rand(6, 1, 28, 28), torch.tensor([0, 1, 2, 3, 4, 9])
    logp = model(x).log_softmax(1)
    by_hand = -(0.9 * logp[torch.arange(6), y] + 0.1 / 10 * logp.sum(1)).mean()
    assert float(model.train_loss((x, y)).detach()) == pytest.approx(float(by_hand), rel=1e-6)
    plain = -logp[torch.arange(6), y].mean()
    assert float(model.model_step((x, y))[0]) == pytest.approx(float(plain), rel=1e-6)
    assert float(by_hand) != pytest.approx(float(plain), rel=1e-3)
    with pytest.raises(ConfigError, match=r"module.label_smoothing=1.0 is outside \[0, 1\)"):
        tiny_classifier(label_smoothing=1.0)


class RawWeights(L.Callback):
    """The raw (not averaged) weights of the linear layer after every optimizer step."""

    def __init__(self):
        self.weights = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append(pl_module.net[1].weight.detach().clone())


def test_ema_averages_every_step_and_leaves_the_average_in_the_model(synthetic_root):
    """``AveragedModel``'s EMA: the first step copies, then ``w_ema = d w_ema + (1 - d) w``; at the end of
    fit the model holds the average. ``auto`` steps per execution is 1 beside it (one update per step)."""
    dm = MNISTDataModule(root=synthetic_root, batch_size=100)
    model, raw = tiny_classifier(), RawWeights()
    trainer = L.Trainer(max_steps=3, callbacks=[raw, EMA(decay=0.5)], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    w1, w2, w3 = raw.weights
    assert len(raw.weights) == 3 and not torch.equal(w1, w3)
    assert torch.allclose(model.net[1].weight, 0.5 * (0.5 * w1 + 0.5 * w2) + 0.5 * w3, atol=1e-7)
    with pytest.raises(ConfigError, match=r"callbacks.ema.decay=1.0 is outside \[0, 1\)"):
        EMA(decay=1.0)


def test_an_ema_run_tests_and_saves_the_averaged_weights(synthetic_root, tmp_path):
    """Validation, the checkpoint that val/loss picks, the test metrics of the run and a later
    ``evaluate`` all see the average; the raw weights stay in the checkpoint for ``resume=``. (Lightning's
    own callback would put the raw weights back when ``Trainer.test`` loads the checkpoint.)"""
    cfg = load_config(["model=depthwise_3k", f"data.root={synthetic_root}", "trainer.max_epochs=2", "eval.full=false",
                       "+callbacks.ema._target_=mnist_lab.callbacks.EMA", "+callbacks.ema.decay=0.9", *QUIET])
    metrics = train(cfg, tmp_path / "run")
    assert metrics["steps_per_execution"] == 1
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt", weights_only=True)
    averaged, current = ckpt["state_dict"], ckpt["current_model_state"]
    assert any(not torch.equal(averaged[k], current[k]) for k in averaged if k.startswith("net."))
    result = evaluate_ensemble([tmp_path / "run" / "checkpoints" / "best.ckpt"], data_root=synthetic_root)
    assert result["ensemble"]["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert result["ensemble"]["test/nll"] == pytest.approx(metrics["test/loss"], rel=1e-5)


def test_shift_pixels_moves_whole_pixels_and_fills_with_background():
    x = torch.arange(1, 10, dtype=torch.uint8).reshape(1, 3, 3)
    assert shift_pixels(x, 1, 0).tolist() == [[[0, 1, 2], [0, 4, 5], [0, 7, 8]]]
    assert shift_pixels(x, 0, -1).tolist() == [[[4, 5, 6], [7, 8, 9], [0, 0, 0]]]
    assert torch.equal(shift_pixels(x, 0, 0), x)


def test_test_time_augmentation_averages_the_shifted_views_and_is_chosen_on_validation(fc_run, synthetic_root,
                                                                                        monkeypatch):
    run, metrics = fc_run
    ckpt = run / metrics["test_ckpt"]
    calls = []
    monkeypatch.setattr(evaluate_module, "predict", lambda *a: calls.append(1) or predict(*a))
    everything = evaluate_ensemble([ckpt], data_root=synthetic_root, tta=True)
    result = everything["tta"]
    assert len(calls) == 2 * len(TTA_SHIFTS)  # each view of val and test predicted once, the plain one included
    dm = MNISTDataModule(root=synthetic_root)
    dm.setup()
    model = Classifier.load_from_checkpoint(ckpt).eval()

    def acc(split, shifts):
        x, y = dm.splits[split]
        with torch.no_grad():
            p = torch.stack([model(to_unit(shift_pixels(x, dx, dy))).softmax(1) for dx, dy in shifts]).mean(0)
        return float((p.argmax(1) == y).float().mean()), float(F.nll_loss(p.log(), y))

    assert len(TTA_SHIFTS) == 5 and TTA_SHIFTS[0] == (0, 0)
    assert everything["ensemble"]["test/acc"] == pytest.approx(acc("test", [(0, 0)])[0], abs=1e-6)
    assert result["test/acc_tta"] == pytest.approx(acc("test", TTA_SHIFTS)[0], abs=1e-6)
    assert result["test/nll_tta"] == pytest.approx(acc("test", TTA_SHIFTS)[1], rel=1e-5)
    assert (result["val/acc"], result["val/acc_tta"]) == pytest.approx((acc("val", [(0, 0)])[0],
                                                                        acc("val", TTA_SHIFTS)[0]), abs=1e-6)
    assert result["chosen"] == (result["val/acc_tta"] > result["val/acc"])
    out = json.dumps(result)
    assert "test/acc\"" not in out  # the plain test accuracy is the ensemble's, not repeated here


def test_depthwise_kernel_size_costs_k2_per_channel_by_hand():
    # stem 9*6 + BN 12 = 66; block 6 -> 8, 5x5: 25*6 + 12 (BN) + 48 + 16 (BN) = 226; block 8 -> 16:
    # 25*8 + 16 + 128 + 32 = 376; Linear 16*10 + 10 = 170
    net = DepthwiseNet(stem=6, widths=[8, 16], strides=[2, 2], kernel_size=5)
    assert count_parameters(net) == 66 + 226 + 376 + 170
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ConfigError, match="model.kernel_size=4 must be odd"):
        DepthwiseNet(kernel_size=4)


def test_depthwise_repeats_apply_one_set_of_convolutions_residually_by_hand():
    # stem 9*8 + BN 16 = 88; block 8 -> 14, stride 2: 72 + 16 + 112 + 28 = 228; block 14 -> 14 applied 3
    # times: its convolutions once (9*14 + 14*14 = 322) and two BatchNorms per application (3 * 56 = 168);
    # Linear 14*10 + 10 = 150
    torch.manual_seed(0)
    net = DepthwiseNet(stem=8, widths=[14, 14], strides=[2, 1], repeats=[1, 3])
    assert count_parameters(net) == 88 + 228 + 322 + 168 + 150
    shared = next(m for m in net.modules() if isinstance(m, SharedBlock))
    for bn in shared.modules():  # statistics and affines unlike the defaults, so each application differs
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
            bn.bias.data.uniform_(-0.5, 0.5)
    net.eval()
    x = torch.randn(2, 14, 14, 14)
    expected = x
    for bn_dw, bn_pw in shared.norms:
        h = F.relu(bn_dw(F.conv2d(expected, shared.depthwise.weight, padding=1, groups=14)))
        expected = expected + F.relu(bn_pw(F.conv2d(h, shared.pointwise.weight)))
    torch.testing.assert_close(shared(x), expected)
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ConfigError, match=r"model.repeats=\[1, 2\] needs one count >= 1 per block"):
        DepthwiseNet(widths=[8, 16], strides=[2, 1], repeats=[1, 2])  # 8 -> 16: cannot repeat
    with pytest.raises(ConfigError, match="model.repeats"):
        DepthwiseNet(widths=[16, 16], strides=[2, 2], repeats=[1, 2])  # stride 2: cannot repeat
