"""The ConvNet family: exact published parameter counts, layer order, and config errors."""

import inspect

import pytest
import torch
from torch import nn

from mnist_lab.errors import ConfigError
from mnist_lab.models import ConvNet, build_model, count_parameters, list_presets, model_config

# trainable parameters of the published architectures (valid 3x3 convs, 2x2 max-pool)
PUBLISHED = {"fc": 101_770, "conv1": 693_962, "conv2": 225_034, "conv2_bn": 225_482, "conv3": 93_322}


def kinds(seq: nn.Sequential) -> list[str]:
    return [type(m).__name__ for m in seq]


def test_presets_are_the_published_set_and_the_family_base():
    assert list_presets() == sorted([*PUBLISHED, "convnet"])


def test_the_family_base_is_convnets_defaults_so_presets_state_only_what_differs():
    base = model_config("convnet")
    assert base == {"_target_": "mnist_lab.models.ConvNet", **{
        k: list(p.default) if isinstance(p.default, tuple) else p.default
        for k, p in inspect.signature(ConvNet).parameters.items()}}
    assert model_config("conv2") == {**base, "name": "conv2"}
    assert model_config("conv2_bn") == {**base, "name": "conv2_bn", "dropout": 0.25, "dropout_all_blocks": True,
                                        "dense_dropout": 0.5, "batchnorm": True}


@pytest.mark.parametrize(("name", "count"), PUBLISHED.items())
def test_preset_has_the_published_parameter_count(name, count):
    model = build_model(name)
    assert count_parameters(model) == count
    assert model.name == name
    assert model.eval()(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_conv2_with_dropout_adds_one_dropout_after_the_second_pool():
    model = build_model("conv2", dropout=0.25)
    assert count_parameters(model) == PUBLISHED["conv2"]
    assert kinds(model.backbone) == ["Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "MaxPool2d", "Dropout", "Flatten"]
    assert model.backbone[6].p == 0.25
    assert kinds(model.head) == ["Linear", "ReLU", "Linear"]


def test_conv2_bn_puts_batchnorm_before_relu_and_dropout_025_025_05():
    model = build_model("conv2_bn")
    assert kinds(model.backbone) == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "Dropout"] * 2 + ["Flatten"]
    assert kinds(model.head) == ["Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear"]
    rates = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    assert rates == [0.25, 0.25, 0.5]


def test_conv3_has_no_pool_after_the_third_conv_and_dropout_before_the_logits():
    model = build_model("conv3")
    assert kinds(model.backbone) == ["Conv2d", "ReLU", "MaxPool2d"] * 2 + ["Conv2d", "ReLU", "Flatten"]
    assert model.num_features == 3 * 3 * 64
    assert kinds(model.head) == ["Linear", "ReLU", "Dropout", "Linear"]
    assert model.head[0].out_features == 64 and model.head[2].p == 0.5


def test_fc_is_a_dense_net_on_raw_pixels():
    model = build_model("fc")
    assert kinds(model.backbone) == ["Flatten"]
    assert model.num_features == 784


@pytest.mark.parametrize(("depth", "count"), [(0, 101_770), (1, 693_962), (2, 225_034), (3, 130_890)])
def test_depth_sweep_from_conv2_walks_the_family(depth, count):
    # depth 3 = conv3's trunk (no third pool, 3x3x64 features) with conv2's Dense 128:
    # 320 + 18,496 + 36,928 + (576 * 128 + 128) + (128 * 10 + 10) = 130,890
    assert count_parameters(build_model("conv2", depth=depth)) == count


@pytest.mark.parametrize("depth", [0, 1, 2, 3])
@pytest.mark.parametrize("batchnorm", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.25, 0.5])
def test_ablation_grid_points_build_with_the_asked_layers(depth, batchnorm, dropout):
    model = build_model("conv2", depth=depth, batchnorm=batchnorm, dropout=dropout)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    drops = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(convs) == depth
    assert len(bns) == (depth + 1 if batchnorm else 0)
    assert drops == ([dropout] if dropout else [])
    # BatchNorm adds exactly 2 trainable parameters per normalised channel
    extra = 2 * (sum(c.out_channels for c in convs) + 128) if batchnorm else 0
    assert count_parameters(model) == count_parameters(build_model("conv2", depth=depth)) + extra
    assert model.train()(torch.randn(4, 1, 28, 28)).shape == (4, 10)


@pytest.mark.parametrize("rate", [1.0, -0.1, 1.5])
def test_dropout_outside_0_1_is_rejected(rate):
    with pytest.raises(ConfigError, match=r"model.dropout=.* is outside \[0, 1\)"):
        build_model("conv2", dropout=rate)
    with pytest.raises(ConfigError, match="model.dense_dropout"):
        ConvNet(dense_dropout=rate)


def test_negative_depth_and_too_short_width_lists_are_rejected():
    with pytest.raises(ConfigError, match="model.depth=-1 must be an integer >= 0"):
        build_model("conv2", depth=-1)
    with pytest.raises(ConfigError, match="model.depth=4 needs 4 conv widths"):
        build_model("conv2", depth=4)
    with pytest.raises(ConfigError, match="shrinks to nothing"):
        ConvNet(depth=5, channels=[8] * 5, pool=[True] * 5)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="unknown model preset 'conv9'; choose one of conv1, conv2, conv2_bn"):
        build_model("conv9")
