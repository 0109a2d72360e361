"""ConvNet: one family of MNIST classifiers, from a dense baseline (depth 0) to deep conv stacks.

A model is ``backbone`` (conv blocks, then Flatten) followed by ``head`` (one hidden dense layer
and the linear layer that gives the logits). Every published architecture mnist_lab compares
(``conf/model/*.yaml``) is a point in this space, so a sweep can walk depth, widths, dropout and
BatchNorm from any preset.

Conv block ``i`` (1-based): ``Conv2d(k x k, valid or same padding) -> [BatchNorm2d] -> activation ->
[MaxPool2d(2)] -> [Dropout]``, then Flatten (or global average pooling). Head: ``Linear ->
[BatchNorm1d] -> activation -> [Dropout] -> Linear``.
Layer order and parameter counts follow Keras (``Conv2D``, ``Dense``, ``BatchNormalization`` with
its 2 trainable parameters per channel), which the published tables were made with.
"""

from collections.abc import Sequence

import torch
from torch import nn

from mnist_lab.errors import ConfigError, check_list, check_rate

#: ``model.activation`` names -> layers (ReLU is the published choice; GELU, Hendrycks & Gimpel 2016;
#: SiLU, Elfwing et al. 2018).
ACTIVATIONS = {"relu": lambda: nn.ReLU(inplace=True), "gelu": nn.GELU, "silu": lambda: nn.SiLU(inplace=True)}


class ConvNet(nn.Module):
    """A conv-net classifier of configurable depth, width, dropout and BatchNorm.

    Input: float32 ``(B, in_channels, image_size, image_size)`` normalised images.
    Output: float32 logits ``(B, num_classes)``.

    Args:
        depth: number of conv blocks (0 = the dense baseline ``fc``).
        channels: output channels of blocks 1, 2, ...; needs at least ``depth`` entries (extra
            entries are unused, so a preset can be swept to a larger depth).
        pool: per block, whether a 2x2 max-pool follows it; at least ``depth`` entries.
        kernel_size: conv kernel size in pixels (stride 1).
        padding: ``"valid"`` (no padding: a k x k conv trims k - 1 px, as published) or ``"same"``.
        activation: ``"relu"``, ``"gelu"`` or ``"silu"``, after every conv and the hidden dense layer.
        head: ``"flatten"`` (the feature map, flattened, as published) or ``"gap"`` (global average
            pooling: one feature per channel of the last block; needs ``depth >= 1``).
        width: multiplier of every conv's channels and of ``dense_units`` (rounded, at least 1).
        dense_units: width of the hidden dense layer of the head (0 = logits straight from the
            backbone features).
        dropout: dropout rate on the backbone's output features (after the last conv block's
            pool; for ``depth=0``, on the input pixels). With ``dropout_all_blocks``, after every block.
        dropout_all_blocks: put ``dropout`` after every conv block instead of the last only.
        dense_dropout: dropout rate after the hidden dense layer.
        batchnorm: BatchNorm after every conv and after the hidden dense layer, before ReLU
            (conv and dense keep their bias, as in the published ``conv2_bn``).
        in_channels, image_size, num_classes: input channels, input side in pixels, classes.
        name: preset name, for reports (``"conv2"``); not used by the network itself.

    Raises:
        ConfigError: negative depth, too few ``channels``/``pool`` entries, a dropout rate outside
            [0, 1), a depth whose feature map shrinks below 1 pixel, an unknown padding / activation
            / head, ``head="gap"`` at depth 0, or a width multiplier <= 0.
    """

    def __init__(
        self,
        depth: int = 2,
        channels: Sequence[int] = (32, 64, 64),
        pool: Sequence[bool] = (True, True, False),
        kernel_size: int = 3,
        padding: str = "valid",
        activation: str = "relu",
        head: str = "flatten",
        width: float = 1.0,
        dense_units: int = 128,
        dropout: float = 0.0,
        dropout_all_blocks: bool = False,
        dense_dropout: float = 0.0,
        batchnorm: bool = False,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        name: str | None = None,
    ):
        super().__init__()
        if not isinstance(depth, int) or depth < 0:
            raise ConfigError(f"model.depth={depth!r} must be an integer >= 0 (0 = dense baseline)")
        channels = check_list("model.channels", channels, "model.channels=[32,64,64]")
        pool = check_list("model.pool", pool, "model.pool=[true,true,false]")
        if len(channels) < depth or len(pool) < depth:
            raise ConfigError(
                f"model.depth={depth} needs {depth} conv widths and pool flags, but model.channels="
                f"{channels} and model.pool={pool}; give longer lists, e.g. model.channels=[32,64,64,128] "
                "model.pool=[true,true,false,false]")
        if dense_units < 0:
            raise ConfigError(f"model.dense_units={dense_units} must be >= 0 (0 = no hidden layer)")
        dropout, dense_dropout = check_rate("model.dropout", dropout), check_rate("model.dense_dropout", dense_dropout)
        for key, value, choices in (("padding", padding, ("valid", "same")), ("activation", activation, ACTIVATIONS),
                                    ("head", head, ("flatten", "gap"))):
            if value not in choices:
                raise ConfigError(f"unknown model.{key}={value!r}; choose one of {', '.join(choices)}")
        if head == "gap" and depth == 0:
            raise ConfigError("model.head=gap pools conv features: it needs model.depth >= 1")
        if not width > 0:
            raise ConfigError(f"model.width={width} must be > 0 (1 = the preset's widths)")
        channels = [max(1, round(c * width)) for c in channels]
        dense_units = max(1, round(dense_units * width)) if dense_units else 0
        self.name = name or f"convnet_d{depth}"
        self.backbone, c, size = self._backbone(depth, channels, pool, kernel_size, padding, ACTIVATIONS[activation],
                                                head, dropout, dropout_all_blocks, batchnorm, in_channels, image_size)
        self.num_features = c * size * size
        self.head = self._head(self.num_features, dense_units, ACTIVATIONS[activation], dense_dropout, batchnorm,
                               num_classes)

    @staticmethod
    def _backbone(depth, channels, pool, kernel_size, padding, act, head, dropout, dropout_all_blocks, batchnorm,
                  in_channels, image_size) -> tuple[nn.Sequential, int, int]:
        """The conv blocks, then Flatten; returns it with the output channels and feature-map side (px)."""
        layers: list[nn.Module] = []
        c, size = in_channels, image_size
        for i in range(depth):
            size = size - kernel_size + 1 if padding == "valid" else size
            layers.append(nn.Conv2d(c, channels[i], kernel_size, padding=padding))
            if batchnorm:
                layers.append(nn.BatchNorm2d(channels[i]))
            layers.append(act())
            if pool[i]:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            if size < 1:
                raise ConfigError(f"model.depth={depth}: the feature map of {image_size}px images shrinks "
                                  f"to nothing at block {i + 1}; lower depth or set some model.pool to false")
            if dropout and (dropout_all_blocks or i == depth - 1):
                layers.append(nn.Dropout(dropout))
            c = channels[i]
        if head == "gap":
            layers.append(nn.AdaptiveAvgPool2d(1))
            size = 1
        layers.append(nn.Flatten())
        if depth == 0 and dropout:
            layers.append(nn.Dropout(dropout))
        return nn.Sequential(*layers), c, size

    @staticmethod
    def _head(features: int, dense_units: int, act, dense_dropout: float, batchnorm: bool,
              num_classes: int) -> nn.Sequential:
        """``Linear -> [BatchNorm1d] -> activation -> [Dropout] -> Linear`` (the last alone without dense units)."""
        dense: list[nn.Module] = []
        if dense_units:
            dense.append(nn.Linear(features, dense_units))
            if batchnorm:
                dense.append(nn.BatchNorm1d(dense_units))
            dense.append(act())
            if dense_dropout:
                dense.append(nn.Dropout(dense_dropout))
            features = dense_units
        dense.append(nn.Linear(features, num_classes))
        return nn.Sequential(*dense)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters; BatchNorm running statistics are buffers, not counted."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
