"""DepthwiseNet: depthwise-separable convolutions (Howard et al. 2017, "MobileNets: Efficient
Convolutional Neural Networks for Mobile Vision Applications"), scaled to 28x28 digits.

A 3x3 stem ``Conv -> BN -> ReLU``, then one depthwise-separable block per entry of ``widths``:
``depthwise Conv k x k (groups = channels) -> BN -> ReLU -> pointwise Conv 1x1 -> BN -> ReLU``, the
depthwise conv strided where ``strides`` says 2. Head: global average pool -> [Dropout] -> Linear.
Convolutions have no bias (a BatchNorm follows each). A block costs ``k^2 c_in + c_in c_out`` weights
instead of a full conv's ``k^2 c_in c_out``, which is what takes the family down to a few thousand
parameters; a 5x5 depthwise kernel widens the receptive field for ``16 c_in`` more weights a block.

``repeats`` buys depth without weights: a block repeated ``r`` times applies its two convolutions ``r``
times, residually (``x <- x + block(x)``), each application with BatchNorms of its own (a weight-tied
residual recurrence with step-specific normalisation, Liao & Poggio 2016, "Bridging the Gaps Between
Residual Learning, Recurrent Neural Networks and Visual Cortex"): ``r`` applications cost the
convolutions once and ``4 c`` BatchNorm parameters each.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mnist_lab.errors import ConfigError, check_list, check_rate


def _conv(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False)  # a BatchNorm follows


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [_conv(c_in, c_out, kernel, stride, groups), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class SharedBlock(nn.Module):
    """A depthwise-separable block of ``channels`` channels (stride 1) applied ``repeats`` times with the
    same convolution weights, residually, with BatchNorms per application. Input and output: float
    ``(B, channels, H, W)``."""

    def __init__(self, channels: int, kernel_size: int, repeats: int):
        super().__init__()
        self.depthwise = _conv(channels, channels, kernel_size, groups=channels)
        self.pointwise = _conv(channels, channels, 1)
        self.norms = nn.ModuleList(nn.ModuleList([nn.BatchNorm2d(channels), nn.BatchNorm2d(channels)])
                                   for _ in range(repeats))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for bn_depthwise, bn_pointwise in self.norms:
            x = x + F.relu(bn_pointwise(self.pointwise(F.relu(bn_depthwise(self.depthwise(x))))))
        return x


class DepthwiseNet(nn.Module):
    """Depthwise-separable conv net. Input: float ``(B, in_channels, H, W)`` normalised images; output:
    logits ``(B, num_classes)``.

    Args:
        stem: output channels of the 3x3 stem convolution.
        widths: output channels of each depthwise-separable block.
        strides: stride (1 or 2) of each block's depthwise conv, one entry per block.
        kernel_size: side of the depthwise kernels in pixels (odd; 3 as in MobileNet).
        repeats: applications of each block's weights (default 1 each); a block with more than one
            (:class:`SharedBlock`) keeps its input's channels and size, so needs width = its input
            channels and stride 1.
        dropout: dropout rate before the linear head.
        in_channels, num_classes: input channels, classes.
        name: preset name, for reports.

    Raises:
        ConfigError: ``widths`` and ``strides`` of different lengths, a stride other than 1 or 2, an even
            or non-positive ``kernel_size``, a dropout rate outside [0, 1), or ``repeats`` of another length,
            below 1, or above 1 for a block that changes the channels or strides.
    """

    def __init__(self, stem: int = 16, widths: Sequence[int] = (32, 64, 64), strides: Sequence[int] = (2, 2, 1),
                 dropout: float = 0.0, in_channels: int = 1, num_classes: int = 10, name: str | None = None,
                 kernel_size: int = 3, repeats: Sequence[int] | None = None):
        super().__init__()
        widths = check_list("model.widths", widths, "model.widths=[32,64]")
        strides = check_list("model.strides", strides, "model.strides=[2,2]")
        repeats = [1] * len(widths) if repeats is None else check_list("model.repeats", repeats, "model.repeats=[1,3]")
        if len(widths) != len(strides) or any(s not in (1, 2) for s in strides):
            raise ConfigError(f"model.widths={widths} and model.strides={strides} need one stride (1 or 2) per "
                              "block, e.g. model.widths=[32,64] model.strides=[2,2]")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(f"model.kernel_size={kernel_size} must be odd and positive (a centred kernel keeps "
                              "the image size at stride 1), e.g. model.kernel_size=5")
        dropout = check_rate("model.dropout", dropout)
        inputs = [stem, *widths[:-1]]
        if len(repeats) != len(widths) or any(
                not isinstance(r, int) or r < 1 or (r > 1 and (s != 1 or c != w))
                for r, s, c, w in zip(repeats, strides, inputs, widths)):
            raise ConfigError(f"model.repeats={repeats} needs one count >= 1 per block of model.widths={widths}, and "
                              "a block repeated more than once keeps its input's channels at stride 1, e.g. "
                              "model.widths=[16,16] model.strides=[2,1] model.repeats=[1,3]")
        self.name = name or "depthwise"
        layers, c = _conv_bn(in_channels, stem, 3), stem
        for width, stride, r in zip(widths, strides, repeats):
            if r > 1:
                layers.append(SharedBlock(c, kernel_size, r))
            else:
                layers += _conv_bn(c, c, kernel_size, stride, groups=c) + _conv_bn(c, width, 1)
            c = width
        self.backbone = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(*([nn.Dropout(dropout)] if dropout else []), nn.Linear(c, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
