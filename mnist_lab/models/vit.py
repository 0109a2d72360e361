"""ViT: a small Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words").

The image is cut into non-overlapping ``patch_size`` x ``patch_size`` patches (4 px: 49 patches of a
28x28 digit; 7 px: 16), each embedded linearly (a strided conv); a learned position embedding is
added, with a class token in front when ``pool="cls"``. Then ``depth`` pre-norm encoder blocks
(``torch.nn.TransformerEncoderLayer(norm_first=True)``: LayerNorm -> multi-head self-attention, which
runs on ``F.scaled_dot_product_attention`` -> residual; LayerNorm -> MLP with GELU -> residual), a
final LayerNorm, and a linear head on the class token (``cls``) or the mean of the patch tokens (``mean``).
"""

import torch
from torch import nn

from mnist_lab.errors import ConfigError, check_choice, check_rate


class ViT(nn.Module):
    """Vision Transformer. Input: float ``(B, in_channels, image_size, image_size)`` normalised
    images; output: logits ``(B, num_classes)``.

    Args:
        patch_size: patch side in pixels; must divide ``image_size``.
        dim: token width.
        depth: encoder blocks.
        heads: attention heads; must divide ``dim``.
        mlp_ratio: MLP hidden width / ``dim``.
        pool: ``"cls"`` (class token) or ``"mean"`` (mean of the patch tokens).
        dropout: dropout rate in attention and MLP.
        image_size, in_channels, num_classes: input side in pixels, input channels, classes.
        name: preset name, for reports.

    Raises:
        ConfigError: a patch size that does not divide the image, heads that do not divide ``dim``,
            an unknown ``pool``, or a dropout rate outside [0, 1).
    """

    def __init__(self, patch_size: int = 4, dim: int = 64, depth: int = 4, heads: int = 4, mlp_ratio: float = 2.0,
                 pool: str = "cls", dropout: float = 0.0, image_size: int = 28, in_channels: int = 1,
                 num_classes: int = 10, name: str | None = None):
        super().__init__()
        if image_size % patch_size:
            raise ConfigError(f"model.patch_size={patch_size} must divide the {image_size}px image (e.g. 4 or 7)")
        if dim % heads:
            raise ConfigError(f"model.heads={heads} must divide model.dim={dim}")
        check_choice("model.pool", pool, ("cls", "mean"))
        dropout, self.name, self.pool = check_rate("model.dropout", dropout), name or "vit", pool
        tokens = (image_size // patch_size) ** 2 + (pool == "cls")
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, int(dim * mlp_ratio), dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(dim), enable_nested_tensor=False)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, patches, dim)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.encoder(x + self.pos_embed)
        return self.head(x[:, 0] if self.cls_token is not None else x.mean(1))
