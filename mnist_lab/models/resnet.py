"""ResNet: a pre-activation residual network for 28x28 inputs (He, Zhang, Ren & Sun 2016, "Identity
Mappings in Deep Residual Networks", the CIFAR variant of their section 4, scaled down).

A 3x3 stem convolution, then one stage per entry of ``widths``: ``blocks[i]`` pre-activation blocks
``BN -> ReLU -> Conv 3x3 -> BN -> ReLU -> Conv 3x3`` plus the identity (or a strided 1x1 projection
where the shape changes); every stage after the first halves the feature map (28 -> 14 -> 7 px).
Head: ``BN -> ReLU -> global average pool -> [Dropout] -> Linear``. Convolutions have no bias (a
BatchNorm follows each).
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mnist_lab.errors import ConfigError, check_list, check_rate


class PreActBlock(nn.Module):
    """One pre-activation residual block: ``(B, c_in, H, W)`` -> ``(B, c_out, H / stride, W / stride)``."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.projection = nn.Conv2d(c_in, c_out, 1, stride, bias=False) if stride != 1 or c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.projection(out) if self.projection is not None else x
        return self.conv2(F.relu(self.bn2(self.conv1(out)))) + shortcut


class ResNet(nn.Module):
    """Pre-activation ResNet. Input: float ``(B, in_channels, H, W)`` normalised images; output:
    logits ``(B, num_classes)``.

    Args:
        widths: channels of each stage (the stem has ``widths[0]``).
        blocks: residual blocks per stage, one entry per stage.
        dropout: dropout rate before the linear head.
        in_channels, num_classes: input channels, classes.
        name: preset name, for reports.

    Raises:
        ConfigError: ``widths`` and ``blocks`` of different lengths or empty, a stage without blocks,
            or a dropout rate outside [0, 1).
    """

    def __init__(self, widths: Sequence[int] = (16, 32, 64), blocks: Sequence[int] = (1, 1, 1),
                 dropout: float = 0.0, in_channels: int = 1, num_classes: int = 10, name: str | None = None):
        super().__init__()
        widths = check_list("model.widths", widths, "model.widths=[16,32,64]")
        blocks = check_list("model.blocks", blocks, "model.blocks=[1,1,1]")
        if not widths or len(widths) != len(blocks) or min(blocks) < 1:
            raise ConfigError(f"model.widths={widths} and model.blocks={blocks} need one entry per stage and "
                              "at least one block each, e.g. model.widths=[16,32,64] model.blocks=[1,1,1]")
        dropout = check_rate("model.dropout", dropout)
        self.name = name or "resnet"
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)]
        c = widths[0]
        for i, (width, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                layers.append(PreActBlock(c, width, stride=2 if i > 0 and j == 0 else 1))
                c = width
        layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.backbone = nn.Sequential(*layers)
        self.head = nn.Sequential(*([nn.Dropout(dropout)] if dropout else []), nn.Linear(c, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
