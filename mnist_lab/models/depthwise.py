"""DepthwiseNet: depthwise-separable convolutions (Howard et al. 2017, "MobileNets: Efficient
Convolutional Neural Networks for Mobile Vision Applications"), scaled to 28x28 digits.

A 3x3 stem ``Conv -> BN -> ReLU``, then one depthwise-separable block per entry of ``widths``:
``depthwise Conv k x k (groups = channels) -> BN -> ReLU -> pointwise Conv 1x1 -> BN -> ReLU``, the
depthwise conv strided where ``strides`` says 2. Head: global average pool -> [Dropout] -> Linear.
Convolutions have no bias (a BatchNorm follows each). A block costs ``k^2 c_in + c_in c_out`` weights
instead of a full conv's ``k^2 c_in c_out``, which is what takes the family down to a few thousand
parameters; a 5x5 depthwise kernel widens the receptive field for ``16 c_in`` more weights a block.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mnist_lab.errors import ConfigError, check_rate


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True)]


class DepthwiseNet(nn.Module):
    """Depthwise-separable conv net. Input: float ``(B, in_channels, H, W)`` normalised images; output:
    logits ``(B, num_classes)``.

    Args:
        stem: output channels of the 3x3 stem convolution.
        widths: output channels of each depthwise-separable block.
        strides: stride (1 or 2) of each block's depthwise conv, one entry per block.
        kernel_size: side of the depthwise kernels in pixels (odd; 3 as in MobileNet).
        dropout: dropout rate before the linear head.
        in_channels, num_classes: input channels, classes.
        name: preset name, for reports.

    Raises:
        ConfigError: ``widths`` and ``strides`` of different lengths, a stride other than 1 or 2, an even
            or non-positive ``kernel_size``, or a dropout rate outside [0, 1).
    """

    def __init__(self, stem: int = 16, widths: Sequence[int] = (32, 64, 64), strides: Sequence[int] = (2, 2, 1),
                 dropout: float = 0.0, in_channels: int = 1, num_classes: int = 10, name: str | None = None,
                 kernel_size: int = 3):
        super().__init__()
        widths, strides = list(widths), list(strides)
        if len(widths) != len(strides) or any(s not in (1, 2) for s in strides):
            raise ConfigError(f"model.widths={widths} and model.strides={strides} need one stride (1 or 2) per "
                              "block, e.g. model.widths=[32,64] model.strides=[2,2]")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(f"model.kernel_size={kernel_size} must be odd and positive (a centred kernel keeps "
                              "the image size at stride 1), e.g. model.kernel_size=5")
        dropout = check_rate("model.dropout", dropout)
        self.name = name or "depthwise"
        layers, c = _conv_bn(in_channels, stem, 3), stem
        for width, stride in zip(widths, strides):
            layers += _conv_bn(c, c, kernel_size, stride, groups=c) + _conv_bn(c, width, 1)
            c = width
        self.backbone = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(*([nn.Dropout(dropout)] if dropout else []), nn.Linear(c, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
