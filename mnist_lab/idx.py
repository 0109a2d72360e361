"""IDX files (the MNIST format, LeCun et al., "The MNIST database"): read and check them.

An IDX file is a big-endian header (magic number, then one 32-bit size per dimension) followed by
the uint8 data. MNIST, Fashion-MNIST and KMNIST ship one image file (magic 2051, ``(n, 28, 28)``)
and one label file (magic 2049, ``(n,)``) per split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mnist_lab.errors import DataError

MAGIC = {"images": 2051, "labels": 2049}  # 0x00000803 (3-D uint8), 0x00000801 (1-D uint8)
FIX = "Replace it with the original file (delete it and run again with internet to re-download)."


def read_idx(path: Path, kind: str) -> torch.Tensor:
    """Read one uncompressed IDX file, after checking its header against its size.

    Args:
        path: a ``*-idx3-ubyte`` (images) or ``*-idx1-ubyte`` (labels) file.
        kind: ``"images"`` or ``"labels"``.

    Returns:
        uint8 ``(n, rows, cols)`` for images, int64 ``(n,)`` for labels.

    Raises:
        DataError: missing or unreadable file, wrong magic number, or a size that does not match the header.
    """
    ndim = 3 if kind == "images" else 1
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"cannot read dataset file {path}: {e.strerror}") from None
    head = 4 + 4 * ndim
    if len(data) < head:
        raise DataError(f"dataset file {path} is truncated: {len(data)} bytes, shorter than an IDX header. {FIX}")
    magic = int.from_bytes(data[:4], "big")
    if magic != MAGIC[kind]:
        raise DataError(f"dataset file {path} is not an IDX {kind} file: magic number {magic}, "
                        f"expected {MAGIC[kind]}. {FIX}")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(data) != head + int(np.prod(shape)):
        raise DataError(f"dataset file {path} is corrupt or truncated: {len(data)} bytes, but its header "
                        f"{shape} needs {head + int(np.prod(shape))}. {FIX}")
    array = torch.from_numpy(np.frombuffer(data, dtype=np.uint8, offset=head).reshape(shape).copy())
    return array if kind == "images" else array.long()


def read_split(images_path: Path, labels_path: Path, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one split's image and label files and check that they belong together.

    Returns:
        uint8 images ``(n, rows, cols)`` and int64 labels ``(n,)``.

    Raises:
        DataError: as :func:`read_idx`, or image and label counts differ, or a label is outside
            ``0 .. num_classes - 1``.
    """
    images, labels = read_idx(images_path, "images"), read_idx(labels_path, "labels")
    if len(images) != len(labels):
        raise DataError(f"{images_path} has {len(images)} images but {Path(labels_path).name} has {len(labels)} "
                        "labels; the files do not belong together. Replace them.")
    bad = labels >= num_classes
    if bad.any():
        raise DataError(f"{labels_path} has {int(bad.sum())} labels outside 0-{num_classes - 1} "
                        f"(e.g. {int(labels[bad][0])}); the file is corrupt. Replace it.")
    return images, labels
