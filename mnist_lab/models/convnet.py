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

from mnist_lab.errors import ConfigError, check_choice, check_count, check_list, check_rate

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

    def __init__(self, depth: int = 2, channels: Sequence[int] = (32, 64, 64),
                 pool: Sequence[bool] = (True, True, False), kernel_size: int = 3, padding: str = "valid",
                 activation: str = "relu", head: str = "flatten",
                 width: float = 1.0, dense_units: int = 128, dropout: float = 0.0, dropout_all_blocks: bool = False,
                 dense_dropout: float = 0.0, batchnorm: bool = False, in_channels: int = 1, image_size: int = 28,
                 num_classes: int = 10, name: str | None = None):
        super().__init__()
        check_count("model.depth", depth, 0, "model.depth=2", " (0: the dense baseline)")
        channels = check_list("model.channels", channels, "model.channels=[32,64,64]")
        pool = check_list("model.pool", pool, "model.pool=[true,true,false]")
        if len(channels) < depth or len(pool) < depth:
            raise ConfigError(
                f"model.depth={depth} needs {depth} conv widths and pool flags, but model.channels="
                f"{channels} and model.pool={pool}; give longer lists, e.g. model.channels=[32,64,64,128] "
                "model.pool=[true,true,false,false]")
        check_count("model.dense_units", dense_units, 0, "model.dense_units=128", " (0: no hidden layer)")
        dropout, dense_dropout = check_rate("model.dropout", dropout), check_rate("model.dense_dropout", dense_dropout)
        for key, value, choices in (("padding", padding, ("valid", "same")), ("activation", activation, ACTIVATIONS),
                                    ("head", head, ("flatten", "gap"))):
            check_choice(f"model.{key}", value, choices)
        if head == "gap" and depth == 0:
            raise ConfigError("model.head=gap pools conv features: it needs model.depth >= 1")
        if not width > 0:
            raise ConfigError(f"model.width={width} must be > 0 (1 = the preset's widths)")
        act, channels = ACTIVATIONS[activation], [max(1, round(c * width)) for c in channels]
        self.name = name or f"convnet_d{depth}"
        layers, c, size = [], in_channels, image_size
        for i in range(depth):  # conv blocks
            size = (size - kernel_size + 1 if padding == "valid" else size) // (2 if pool[i] else 1)
            if size < 1:
                raise ConfigError(f"model.depth={depth}: the feature map of {image_size}px images shrinks "
                                  f"to nothing at block {i + 1}; lower depth or set some model.pool to false")
            layers += [nn.Conv2d(c, channels[i], kernel_size, padding=padding),
                       *_if(batchnorm, nn.BatchNorm2d(channels[i])), act(), *_if(pool[i], nn.MaxPool2d(2)),
                       *_if(dropout and (dropout_all_blocks or i == depth - 1), nn.Dropout(dropout))]
            c = channels[i]
        size = 1 if head == "gap" else size
        self.backbone = nn.Sequential(*layers, *_if(head == "gap", nn.AdaptiveAvgPool2d(1)), nn.Flatten(),
                                      *_if(depth == 0 and dropout, nn.Dropout(dropout)))
        self.num_features = features = c * size * size
        units = max(1, round(dense_units * width)) if dense_units else 0  # the head: [Linear, BN, act, Dropout], Linear
        dense = [nn.Linear(features, units), *_if(batchnorm, nn.BatchNorm1d(units)), act(),
                 *_if(dense_dropout, nn.Dropout(dense_dropout))] if units else []
        self.head = nn.Sequential(*dense, nn.Linear(units or features, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _if(condition, layer: nn.Module) -> list[nn.Module]:
    return [layer] if condition else []


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters; BatchNorm running statistics are buffers, not counted."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
