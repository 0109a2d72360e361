"""SeparableNet: Keras ``SeparableConv2D`` blocks without normalisation, the design of the public sub-1k
MNIST net (JoshWarn/Parameter-Efficient-MNIST, ``997_99.05.py``: 997 parameters, 98.76 % ± 0.11 mean test
accuracy over 223 runs, as its README reports).

A 3x3 stem ``Conv -> MaxPool 2x2 -> LeakyReLU -> Dropout`` (max-pooling commutes with the monotonic
activation: the public net's order, pooled after), then one block per entry of ``widths``: ``depthwise Conv
k x k (no bias) -> pointwise Conv 1x1 (bias) -> LeakyReLU -> Dropout``, every convolution unpadded; head:
global average pool -> Linear. Every parameter is a weight or a bias (no BatchNorm): a block costs
``k^2 c_in + c_in c_out + c_out``.
"""

from collections.abc import Sequence

import torch
from torch import nn

from mnist_lab.errors import ConfigError, check_list, check_rate


class SeparableNet(nn.Module):
    """Input: float ``(B, in_channels, image_size, image_size)`` normalised images; output: logits
    ``(B, num_classes)``.

    Args:
        stem: output channels of the stem convolution.
        widths: output channels of each separable block.
        kernel_size: side of the stem and depthwise kernels in pixels (unpadded: each trims ``k - 1`` px).
        dropout: dropout rate after the stem and after every block.
        negative_slope: LeakyReLU's slope for negative inputs.
        in_channels, image_size, num_classes: input channels, input side in pixels, classes.
        name: preset name, for reports.

    Raises:
        ConfigError: a dropout rate outside [0, 1), or so many blocks that the feature map shrinks to nothing.
    """

    def __init__(self, stem: int = 7, widths: Sequence[int] = (10, 10, 11, 12), kernel_size: int = 3,
                 dropout: float = 0.1, negative_slope: float = 0.2, in_channels: int = 1, image_size: int = 28,
                 num_classes: int = 10, name: str | None = None):
        super().__init__()
        widths, dropout = check_list("model.widths", widths, "model.widths=[10,10,11,12]"), check_rate(
            "model.dropout", dropout)
        if (image_size - kernel_size + 1) // 2 - len(widths) * (kernel_size - 1) < 1:
            raise ConfigError(f"model.widths={widths}: {len(widths)} unpadded {kernel_size}x{kernel_size} blocks "
                              f"shrink the {image_size}px image to nothing; use fewer blocks")
        self.name = name or "separable"

        def tail() -> list[nn.Module]:
            return [nn.LeakyReLU(negative_slope), *([nn.Dropout(dropout)] if dropout else [])]
        layers, c = [nn.Conv2d(in_channels, stem, kernel_size), nn.MaxPool2d(2), *tail()], stem
        for width in widths:
            layers += [nn.Conv2d(c, c, kernel_size, groups=c, bias=False), nn.Conv2d(c, width, 1), *tail()]
            c = width
        self.backbone = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
