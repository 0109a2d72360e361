"""Batched image transforms: uint8 to [0, 1], a per-image random affine, robustness perturbations.

Whole batches on their own device, no per-image Python: torchvision's v2 transforms draw one random
transform per call (one per batch), so per-image augmentation is one ``F.affine_grid`` matrix per image
and a single ``F.grid_sample``. Conventions as ``torchvision.transforms.v2.RandomAffine``: degrees,
positive counter-clockwise as displayed; shifts in pixels, +x right, +y down; scale > 1 enlarges;
pixels from outside the image are 0 (background).
"""

import math

import torch
import torch.nn.functional as F

from mnist_lab.errors import ConfigError


def affine(images: torch.Tensor, angle_deg: torch.Tensor, shift_px: torch.Tensor,
           scale: torch.Tensor) -> torch.Tensor:
    """Rotate, scale and shift every image of a batch by its own parameters.

    The transform maps an input point ``p`` (pixels, relative to the image centre) to
    ``scale * R(angle) @ p + shift``; it is sampled bilinearly with ``F.grid_sample``.

    Args:
        images: float tensor ``(B, C, H, W)``, values in any range (background must be 0).
        angle_deg: ``(B,)`` rotation in degrees, counter-clockwise.
        shift_px: ``(B, 2)`` translation in pixels, columns ``(dx, dy)``.
        scale: ``(B,)`` zoom factor (1 = unchanged).

    Returns:
        float tensor ``(B, C, H, W)`` on the same device and dtype as ``images``.
    """
    b, _, h, w = images.shape
    # affine_grid wants the inverse map (output coords -> input coords) in normalised
    # [-1, 1] coordinates with y pointing down. The inverse of p -> s R(-a) p + t, where
    # R(-a) is a counter-clockwise turn on screen, is q -> R(a) (q - t) / s.
    a = torch.deg2rad(angle_deg.to(images.dtype))
    cos, sin = torch.cos(a) / scale, torch.sin(a) / scale
    tx = shift_px[:, 0].to(images.dtype) * (2.0 / w)
    ty = shift_px[:, 1].to(images.dtype) * (2.0 / h)
    theta = torch.stack([
        torch.stack([cos, -sin * (h / w), -(cos * tx - sin * (h / w) * ty)], dim=1),
        torch.stack([sin * (w / h), cos, -(sin * (w / h) * tx + cos * ty)], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, [b, images.shape[1], h, w], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class RandomAffineBatch:
    """Per-image random rotation, translation and zoom of a batch.

    Every image gets independent parameters, drawn uniformly:
    angle in ``[-degrees, degrees]``, shift in ``[-translate * W, translate * W]`` pixels
    (and ``H`` for y), scale in ``[1 - zoom, 1 + zoom]``.

    Defaults (10 degrees, 10 % shift, 10 % zoom) are the values of the Keras
    ``ImageDataGenerator(rotation_range=10, width_shift_range=0.1, height_shift_range=0.1,
    zoom_range=0.1)`` used by the published MNIST projects mnist_lab is compared with.

    Raises:
        ConfigError: a negative value, ``translate >= 1`` or ``zoom >= 1``.
    """

    def __init__(self, degrees: float = 10.0, translate: float = 0.1, zoom: float = 0.1):
        if degrees < 0 or not 0 <= translate < 1 or not 0 <= zoom < 1:
            raise ConfigError(
                f"augmentation needs degrees >= 0, 0 <= translate < 1, 0 <= zoom < 1; got "
                f"degrees={degrees}, translate={translate}, zoom={zoom}. "
                "Fix data.augmentation.* in the config.")
        self.degrees, self.translate, self.zoom = float(degrees), float(translate), float(zoom)

    def sample(self, n: int, height: int, width: int, device: torch.device | str,
               generator: torch.Generator | None = None):
        """Draw parameters for ``n`` images.

        Returns:
            ``(angle_deg (n,), shift_px (n, 2), scale (n,))`` float32 tensors on ``device``.
        """
        u = torch.rand(n, 4, device=device, generator=generator) * 2 - 1  # uniform in [-1, 1)
        angle = u[:, 0] * self.degrees
        shift = u[:, 1:3] * torch.tensor([self.translate * width, self.translate * height],
                                         device=device)
        scale = 1 + u[:, 3] * self.zoom
        return angle, shift, scale

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment a float batch ``(B, C, H, W)``; returns a new tensor of the same shape."""
        angle, shift, scale = self.sample(images.shape[0], images.shape[-2], images.shape[-1],
                                          images.device, generator)
        return affine(images, angle, shift, scale)

    def __repr__(self) -> str:
        return (f"RandomAffineBatch(degrees={self.degrees}, translate={self.translate}, "
                f"zoom={self.zoom})")


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 images ``(B, H, W)`` or ``(B, 1, H, W)`` -> float32 ``(B, 1, H, W)`` in [0, 1]: what every
    model of mnist_lab takes (it normalises inside, see :class:`mnist_lab.module.Classifier`).
    Float input is taken to be in [0, 1] already and returned as float32 ``(B, 1, H, W)``."""
    x = images.to(torch.float32).mul_(1.0 / 255.0) if images.dtype == torch.uint8 else images.to(torch.float32)
    return x.unsqueeze(1) if x.dim() == 3 else x


def shift_pixels(images: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Images moved by whole pixels, ``dx`` right and ``dy`` down; the pixels moved in are 0 (background).
    Exact (no interpolation): the views of test-time augmentation.

    Args:
        images: ``(..., H, W)`` tensor of any dtype (uint8 or float images).
        dx, dy: shifts in pixels, each of absolute value below the image side.

    Returns:
        a new tensor of the same shape, dtype and device.
    """
    h, w = images.shape[-2:]
    out = torch.zeros_like(images)
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        images[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def elastic(images: torch.Tensor, alpha: float, sigma: float = 4.0,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Elastic distortion of every image by its own random displacement field (Simard et al. 2003,
    "Best practices for CNNs applied to visual document analysis": uniform noise in [-1, 1] per pixel
    and axis, smoothed by a Gaussian of ``sigma`` pixels, scaled by ``alpha`` pixels).

    torchvision's ``elastic`` applies one field to a whole batch; here each image gets its own.

    Args:
        images: float ``(B, C, H, W)``, background 0.
        alpha: strength in pixels (Simard's MNIST value: 34; 0 = identity).
        sigma: smoothness in pixels.

    Returns:
        float ``(B, C, H, W)``.
    """
    from torchvision.transforms.v2.functional import gaussian_blur

    b, _, h, w = images.shape
    if alpha == 0:
        return images.clone()
    field = torch.rand(b, 2, h, w, generator=generator, device=images.device, dtype=images.dtype) * 2 - 1
    k = 2 * math.ceil(3 * sigma) + 1
    field = gaussian_blur(field, [k, k], [sigma, sigma]) * alpha  # (B, 2, H, W) in pixels, (dx, dy)
    identity = torch.eye(2, 3, dtype=images.dtype, device=images.device).expand(b, 2, 3)
    grid = F.affine_grid(identity, [b, 1, h, w], align_corners=False)
    grid = grid + field.permute(0, 2, 3, 1) * torch.tensor([2.0 / w, 2.0 / h], device=images.device)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def perturb(images: torch.Tensor, kind: str, strength: float, generator: torch.Generator) -> torch.Tensor:
    """One robustness perturbation of a batch of [0, 1] images ``(B, 1, H, W)``; deterministic for the
    generator's state, so two models see the same perturbed images. Strength units:

    - ``rotation``: degrees; each image turns by ``±strength`` (random sign per image);
    - ``translation``: pixels; each image moves ``strength`` px in a random direction;
    - ``zoom``: scale factor (1 = identity);
    - ``noise``: standard deviation of additive Gaussian noise, in [0, 1] pixel units (clipped to [0, 1]);
    - ``elastic``: ``alpha`` of :func:`elastic` in pixels (sigma 4 px).

    Raises:
        ValueError: unknown ``kind``.
    """
    b, dev = images.shape[0], images.device
    zero, one, zero2 = torch.zeros(b, device=dev), torch.ones(b, device=dev), torch.zeros(b, 2, device=dev)
    if kind == "rotation":
        sign = torch.randint(0, 2, (b,), generator=generator, device=dev) * 2 - 1
        return affine(images, sign * float(strength), zero2, one)
    if kind == "translation":
        phi = torch.rand(b, generator=generator, device=dev) * 2 * math.pi
        shift = torch.stack([torch.cos(phi), torch.sin(phi)], 1) * float(strength)
        return affine(images, zero, shift, one)
    if kind == "zoom":
        return affine(images, zero, zero2, one * float(strength))
    if kind == "noise":
        noise = torch.randn(images.shape, generator=generator, device=dev, dtype=images.dtype)
        return (images + noise * float(strength)).clamp_(0, 1)
    if kind == "elastic":
        return elastic(images, float(strength), generator=generator)
    raise ValueError(f"unknown perturbation {kind!r}; choose rotation, translation, zoom, noise or elastic")
