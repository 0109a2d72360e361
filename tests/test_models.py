"""The ConvNet family: exact published parameter counts, layer order, and config errors."""

import inspect
import re

import pytest
import torch
from torch import nn

from mnist_lab.config import CONF_DIR
from mnist_lab.errors import ConfigError
from mnist_lab.models import ConvNet, build_model, count_parameters, list_presets, model_config
from mnist_lab.module import Classifier


def stated_parameters(preset: str) -> int:
    """The trainable-parameter count a preset's YAML states ("N trainable parameters"), with its source."""
    found = re.search(r"([\d,]+) trainable parameters", (CONF_DIR / "model" / f"{preset}.yaml").read_text())
    assert found, f"conf/model/{preset}.yaml does not state its trainable parameters"
    return int(found.group(1).replace(",", ""))


def families() -> dict[str, list[str]]:
    """The presets of ``conf/model/``, grouped by the network class they build, smallest first."""
    groups: dict[str, list[str]] = {}
    for name in sorted(list_presets(), key=stated_parameters):
        groups.setdefault(model_config(name)["_target_"], []).append(name)
    return groups


def kinds(seq: nn.Sequential) -> list[str]:
    return [type(m).__name__ for m in seq]


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_has_the_parameter_count_its_yaml_states_and_maps_images_to_logits(name):
    model = build_model(name)
    assert count_parameters(model) == stated_parameters(name)
    assert model_config(name).get("name") in (name, None)  # a family's base yaml leaves the name to the class
    assert model.eval()(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_published_counts_and_two_family_counts_by_hand():
    # the published tables (conf/model/<name>.yaml cite them)
    assert {n: stated_parameters(n) for n in ("fc", "conv1", "conv2", "conv2_bn", "conv3")} == {
        "fc": 101_770, "conv1": 693_962, "conv2": 225_034, "conv2_bn": 225_482, "conv3": 93_322}
    # resnet_20k: stem 9*8 = 72; stage 1 (8 -> 8): 2 BN (2*8 each) + 2 convs (9*8*8 each) = 1,184; stage 2
    # (8 -> 16, stride 2): BN 16 + conv 1,152 + BN 32 + conv 2,304 + 1x1 projection 128 = 3,632; stage 3
    # (16 -> 32): 32 + 4,608 + 64 + 9,216 + 512 = 14,432; head BN 64 + Linear 330 = 394
    assert stated_parameters("resnet_20k") == 72 + 1_184 + 3_632 + 14_432 + 394
    # depthwise_5k (the tiny record): stem 9*8 + BN 16 = 88; a block c_in -> c_out costs 9 c_in + 2 c_in (BN)
    # + c_in c_out + 2 c_out (BN): 8->16 248, 16->24 608, 24->32 1,096, 32->48 1,984; Linear 48*10 + 10 = 490
    assert stated_parameters("depthwise_5k") == 88 + 248 + 608 + 1_096 + 1_984 + 490
    # depthwise_1k (the first micro record): stem 88; 8->8 168, 8->12 208, 12->14 328; Linear 14*10 + 10 = 150
    assert stated_parameters("depthwise_1k") == 88 + 168 + 208 + 328 + 150
    # depthwise_shared_1k (round 3's micro record): stem 88; 8->13, stride 2: 72 + 16 + 104 + 26 = 218; 13 -> 13
    # applied 4 times: convolutions 9*13 + 13*13 = 286 once, BatchNorms 4 * 4 * 13 = 208; Linear 13*10 + 10
    assert stated_parameters("depthwise_shared_1k") == 88 + 218 + 286 + 208 + 140
    # separable_997 (the public sub-1k net, micro since round 4): stem 9*7 + 7 = 70; a block c_in -> c_out: 9 c_in
    # (depthwise) + c_in c_out + c_out (pointwise, bias): 7->10 143, 10->10 200, 10->11 211, 11->12 243; Linear 130
    assert stated_parameters("separable_997") == 70 + 143 + 200 + 211 + 243 + 130 == 997


def test_flops_per_image_count_every_layer_by_hand():
    """Forward FLOPs of one image (a multiply-add is 2), attention included (the CPU kernel and the
    transformer layer's fused path are counted too)."""
    # conv2: conv 26*26*32*(3*3*1)*2 + conv 11*11*64*(3*3*32)*2 + dense 1600*128*2 + dense 128*10*2
    assert Classifier(model_config("conv2")).flops_per_image() == 389_376 + 4_460_544 + 409_600 + 2_560
    # vit_70k: patch embedding 49*(4*4*64)*2 = 100,352; each of 2 blocks on 50 tokens of width 64, 4 heads
    # of 16: qkv 50*64*192*2 + scores and weighted sum 2*(4*50*50*16*2) + out 50*64*64*2 + MLP 2*(50*64*128*2)
    # = 1,228,800 + 640,000 + 409,600 + 1,638,400 = 3,916,800; head 64*10*2 = 1,280
    assert Classifier(model_config("vit_70k")).flops_per_image() == 100_352 + 2 * 3_916_800 + 1_280


def test_every_family_has_its_base_yaml_so_presets_state_only_what_differs():
    for target, names in families().items():
        bases = [n for n in names if "defaults" not in (CONF_DIR / "model" / f"{n}.yaml").read_text()]
        assert len(bases) == 1, (target, bases)


def test_the_convnet_base_is_convnets_defaults():
    base = model_config("convnet")
    assert base == {"_target_": "mnist_lab.models.convnet.ConvNet", **{
        k: list(p.default) if isinstance(p.default, tuple) else p.default
        for k, p in inspect.signature(ConvNet).parameters.items()}}
    assert model_config("conv2") == {**base, "name": "conv2"}
    assert model_config("conv2_bn") == {**base, "name": "conv2_bn", "dropout": 0.25, "dropout_all_blocks": True,
                                        "dense_dropout": 0.5, "batchnorm": True}


def test_conv2_with_dropout_adds_one_dropout_after_the_second_pool():
    model = build_model("conv2", dropout=0.25)
    assert count_parameters(model) == stated_parameters("conv2")
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
    with pytest.raises(ConfigError, match="model.depth=-1 must be a non-negative integer"):
        build_model("conv2", depth=-1)
    with pytest.raises(ConfigError, match="model.depth=4 needs 4 conv widths"):
        build_model("conv2", depth=4)
    with pytest.raises(ConfigError, match="shrinks to nothing"):
        ConvNet(depth=5, channels=[8] * 5, pool=[True] * 5)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="unknown model preset 'conv9'; choose one of conv1, conv2, conv2_bn"):
        build_model("conv9")


# ---------------------------------------------------------------- ConvNet's classic knobs
def test_same_padding_gap_head_and_width_change_the_counts_as_computed_by_hand():
    # same padding: 28 -> 14 -> 7 px after two pools; 320 + 18,496 + (7*7*64*128 + 128) + 1,290
    assert count_parameters(build_model("conv2", padding="same")) == 421_642
    # global average pooling: 64 features; 320 + 18,496 + (64*128 + 128) + 1,290
    model = build_model("conv2", head="gap")
    assert count_parameters(model) == 28_426 and model.num_features == 64
    # width 0.5: convs 16 and 32, dense 64; 160 + 4,640 + (5*5*32*64 + 64) + 650
    assert count_parameters(build_model("conv2", width=0.5)) == 56_714
    assert model.eval()(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize(("activation", "layer"), [("relu", nn.ReLU), ("gelu", nn.GELU), ("silu", nn.SiLU)])
def test_the_activation_is_used_after_every_conv_and_the_dense_layer(activation, layer):
    model = build_model("conv3", activation=activation)
    assert sum(isinstance(m, layer) for m in model.modules()) == 4
    assert sum(isinstance(m, (nn.ReLU, nn.GELU, nn.SiLU)) for m in model.modules()) == 4
    assert count_parameters(model) == stated_parameters("conv3")


@pytest.mark.parametrize(("overrides", "message"), [
    ({"activation": "tanh"}, "unknown model.activation='tanh'; choose one of relu, gelu, silu"),
    ({"padding": "full"}, "unknown model.padding='full'"),
    ({"head": "gap", "depth": 0}, "model.head=gap pools conv features: it needs model.depth >= 1"),
    ({"width": 0}, "model.width=0 must be > 0"),
])
def test_bad_convnet_knobs_are_rejected(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_model("conv2", **overrides)


# ---------------------------------------------------------------- the other families
def test_resnet_blocks_add_their_input_and_project_only_where_the_shape_changes():
    model = build_model("resnet_270k")
    blocks = [m for m in model.modules() if type(m).__name__ == "PreActBlock"]
    assert len(blocks) == 9 and sum(b.projection is not None for b in blocks) == 2  # at 16 -> 32 and 32 -> 64
    block = blocks[1]  # 16 -> 16: identity shortcut
    with torch.no_grad():
        block.conv2.weight.zero_()
    x = torch.randn(2, 16, 28, 28)
    assert torch.equal(block.eval()(x), x)
    assert model.backbone(torch.zeros(2, 1, 28, 28)).shape == (2, 64)  # global average pool of 64 channels


def test_depthwise_blocks_are_depthwise_then_pointwise():
    convs = [m for m in build_model("depthwise_3k").modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.groups, c.kernel_size[0]) for c in convs] == [
        (1, 8, 1, 3), (8, 8, 8, 3), (8, 16, 1, 1), (16, 16, 16, 3), (16, 32, 1, 1), (32, 32, 32, 3), (32, 32, 1, 1)]


def test_separable_blocks_are_unpadded_depthwise_then_pointwise_with_leaky_relu_and_dropout():
    net = build_model("separable_997")
    assert kinds(net.backbone)[:8] == ["Conv2d", "MaxPool2d", "LeakyReLU", "Dropout", "Conv2d", "Conv2d", "LeakyReLU",
                                       "Dropout"]
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.groups, c.padding, c.bias is not None) for c in convs[:3]] == [
        (7, 1, (0, 0), True), (7, 7, (0, 0), False), (10, 1, (0, 0), True)]
    assert net.backbone[:-2](torch.zeros(1, 1, 28, 28)).shape == (1, 12, 5, 5)  # 26 -> 13 -> 11, 9, 7, 5 px
    with pytest.raises(ConfigError, match="shrink the 28px image to nothing"):
        build_model("separable_997", widths=[8] * 7)


def test_vit_tokens_pooling_and_bad_settings():
    cls, mean = build_model("vit_70k"), build_model("vit_70k", pool="mean")
    assert cls.pos_embed.shape == (1, 50, 64) and mean.pos_embed.shape == (1, 49, 64)
    assert count_parameters(cls) - count_parameters(mean) == 64 + 64  # the class token and its position
    assert build_model("vit_70k", patch_size=7).pos_embed.shape == (1, 17, 64)
    layer = cls.encoder.layers[0]
    assert layer.norm_first and layer.self_attn.num_heads == 4 and layer.linear1.out_features == 128
    with pytest.raises(ConfigError, match="model.patch_size=5 must divide the 28px image"):
        build_model("vit_70k", patch_size=5)
    with pytest.raises(ConfigError, match="model.heads=5 must divide model.dim=64"):
        build_model("vit_70k", heads=5)
