"""``python -m mnist_lab.predict ckpt_path=PATH inputs='digits/*.png' [output_csv=FILE]``: classify your
own digit images (``Trainer.predict``), a line per file (class, probability, top-3), optionally as CSV.
``inputs`` may be a folder. A file that is not a usable image gets an error on its line and the others
are classified; when none could be, one ``error:`` line and exit code 2. Images of any size and colours
are converted to MNIST's form the way the MNIST digits were made (:func:`to_mnist_form`).
"""

import glob
import sys
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2.functional import pil_to_tensor, resize

from mnist_lab.console import command
from mnist_lab.errors import ConfigError
from mnist_lab.evaluate import predict
from mnist_lab.module import Classifier

BOX = 20    # pixels: the digit's longer side after resizing (MNIST)
SIZE = 28   # pixels: output image side


def to_mnist_form(image: torch.Tensor) -> torch.Tensor:
    """Convert a grayscale image to MNIST's form.

    Steps: scale to [0, 1]; if the border (2 px frame) is brighter than 0.5 on average, invert
    (dark-on-light -> light-on-dark); subtract the border's median (paper or screen background) and
    rescale so the brightest pixel is 1; crop to the pixels above 0.2; resize (antialiased) so the
    longer side is 20 px; paste into 28x28 with the centre of mass at (14, 14).

    Args:
        image: uint8 ``(H, W)`` or ``(1, H, W)``.

    Returns:
        uint8 ``(28, 28)``, light digit on black.

    Raises:
        ValueError: the image is blank (no pixel differs from the background).
    """
    x = image.reshape(image.shape[-2], image.shape[-1]).float() / 255.0
    frame = torch.cat([x[:2].flatten(), x[-2:].flatten(), x[:, :2].flatten(), x[:, -2:].flatten()])
    if frame.mean() > 0.5:
        x, frame = 1.0 - x, 1.0 - frame
    x = (x - frame.median()).clamp_(min=0)
    if float(x.max()) < 1e-3:
        raise ValueError("the image is blank: no pixel stands out from the background")
    x = x / x.max()
    rows, cols = torch.nonzero(x.amax(1) > 0.2).flatten(), torch.nonzero(x.amax(0) > 0.2).flatten()
    x = x[int(rows[0]): int(rows[-1]) + 1, int(cols[0]): int(cols[-1]) + 1]
    h, w = x.shape
    scale = BOX / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    glyph = resize(x[None], [nh, nw], antialias=True)[0].clamp_(0, 1)
    ys, xs = torch.arange(nh, dtype=torch.float32), torch.arange(nw, dtype=torch.float32)
    mass = glyph.sum()
    cy, cx = float((glyph.sum(1) * ys).sum() / mass), float((glyph.sum(0) * xs).sum() / mass)
    top = min(max(round(SIZE / 2 - 0.5 - cy), 0), SIZE - nh)
    left = min(max(round(SIZE / 2 - 0.5 - cx), 0), SIZE - nw)
    out = torch.zeros(SIZE, SIZE)
    out[top: top + nh, left: left + nw] = glyph
    return (out * 255).round().to(torch.uint8)


def load_image(path: str | Path) -> torch.Tensor:
    """Read an image file (PNG, JPEG, GIF, WebP, BMP, ...) and convert it with :func:`to_mnist_form`;
    returns uint8 ``(28, 28)``. Files are decoded by Pillow (torchvision's own decoders are
    deprecated since torchvision 0.29) and converted to grayscale (ITU-R 601 luma).

    Raises:
        ValueError: empty file, not an image, or a blank image (the message says which).
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise ValueError("empty file (0 bytes)")
    try:
        with Image.open(path) as im:
            image = pil_to_tensor(im.convert("L"))
    except (UnidentifiedImageError, OSError) as e:
        reason = "not an image file Pillow can decode" if isinstance(e, UnidentifiedImageError) else str(e)
        raise ValueError(reason) from None
    return to_mnist_form(image)


def predict_files(model: Classifier, paths: list[str | Path], top_k: int = 3) -> list[dict]:
    """Classify image files with a :class:`~mnist_lab.Classifier` (``Trainer.predict``).
    One dict per file, in order: ``file``, ``prediction`` (int or None), ``probability`` (of the
    prediction), ``top`` (``[(class, probability), ...]``), ``error`` ("" if none)."""
    rows, images = [], {}
    for i, p in enumerate(paths):
        rows.append({"file": str(p), "prediction": None, "probability": None, "top": [], "error": ""})
        try:
            images[i] = load_image(p)
        except (ValueError, OSError) as e:
            rows[i]["error"] = str(e)
    if images:
        for i, p in zip(images, predict(model, torch.stack(list(images.values()))).softmax(1).cpu()):
            top = p.topk(min(top_k, p.numel()))
            rows[i]["top"] = [(int(c), float(v)) for v, c in zip(top.values, top.indices)]
            rows[i]["prediction"], rows[i]["probability"] = rows[i]["top"][0]
    return rows


def expand_inputs(inputs) -> list[str]:
    """``inputs`` as a glob pattern, a file, a folder (every file in it, hidden ones aside), or a list
    of these -> sorted file list.

    Raises:
        ConfigError: nothing matched.
    """
    patterns = [inputs] if isinstance(inputs, str) else list(inputs or [])
    paths = {Path(p) for pattern in patterns for p in glob.glob(pattern)}
    paths |= {f for p in list(paths) if p.is_dir() for f in p.iterdir() if not f.name.startswith(".")}
    files = sorted(str(p) for p in paths if p.is_file())
    if not files:
        raise ConfigError(f"inputs={inputs!r} matched no file; quote a glob, e.g. inputs='digits/*.png'")
    return files


@command("predict")
def main(cfg: DictConfig) -> None:
    """``python -m mnist_lab.predict ckpt_path=PATH inputs='digits/*.png' [output_csv=FILE]``."""
    if not cfg.ckpt_path:
        raise ConfigError("give ckpt_path=<run dir>/checkpoints/best.ckpt")
    files = expand_inputs(cfg.inputs)
    rows = predict_files(Classifier.load_from_checkpoint(cfg.ckpt_path, map_location="cpu"), files, top_k=cfg.top_k)
    width = max(len(r["file"]) for r in rows)
    print(f"{'file':<{width}}  class  probability  top-{cfg.top_k}")
    for r in rows:
        if r["error"]:
            print(f"{r['file']:<{width}}  error: {r['error']}")
        else:
            top = " ".join(f"{c}:{p:.3f}" for c, p in r["top"])
            print(f"{r['file']:<{width}}  {r['prediction']:>5}  {r['probability']:>11.4f}  {top}")
    if cfg.output_csv:
        tops = [" ".join(f"{c}:{p:.4f}" for c, p in r["top"]) for r in rows]
        table = pd.DataFrame(rows, dtype=object).assign(top=tops)
        table.to_csv(cfg.output_csv, index=False, lineterminator="\r\n")
        print(f"wrote {cfg.output_csv}")
    failed = sum(bool(r["error"]) for r in rows)
    if failed == len(rows):
        raise ConfigError(f"none of the {len(rows)} files could be classified (each line above says why); give "
                          "image files of digits (PNG, JPEG, ...)")
    if failed:
        print(f"{failed} of {len(rows)} files could not be classified", file=sys.stderr)


if __name__ == "__main__":
    main()
