"""Report plots (matplotlib, written as PNG files; no display needed)."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def read_epoch_metrics(metrics_csv: str | Path) -> dict[str, dict[int, float]]:
    """Read Lightning's ``CSVLogger`` file into ``{metric: {epoch: value}}`` (epoch-level rows only)."""
    series: dict[str, dict[int, float]] = defaultdict(dict)
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("epoch"):
                continue
            epoch = int(float(row["epoch"]))
            for key, value in row.items():
                if key not in ("epoch", "step") and value not in ("", None):
                    series[key][epoch] = float(value)
    return dict(series)


def plot_curves(metrics_csv: str | Path, path: str | Path, title: str = "") -> Path:
    """``curves.png``: train and val loss (left) and top-1 accuracy (right) per epoch."""
    series = read_epoch_metrics(metrics_csv)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric in zip(axes, ("loss", "acc"), strict=False):
        for split, style in (("train", "o-"), ("val", "s--")):
            values = series.get(f"{split}/{metric}", {})
            if values:
                epochs = sorted(values)
                ax.plot([e + 1 for e in epochs], [values[e] for e in epochs], style, label=split)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("cross-entropy loss" if metric == "loss" else "top-1 accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion_matrix(confusion: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """``confusion_matrix.png``: counts ``(C, C)``, rows = true class, columns = predicted class.
    Cells are coloured by the row-normalised rate and labelled with counts."""
    cm = confusion.detach().cpu().to(torch.int64)
    rate = cm.double() / cm.sum(1, keepdim=True).clamp_min(1)
    c = cm.shape[0]
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    im = ax.imshow(rate.numpy(), cmap="Blues", vmin=0, vmax=1)
    for i in range(c):
        for j in range(c):
            if cm[i, j]:
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=7,
                        color="white" if rate[i, j] > 0.5 else "black")
    ax.set_xticks(range(c))
    ax.set_yticks(range(c))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.colorbar(im, ax=ax, label="fraction of true class")
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_samples(images: torch.Tensor, labels: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """``samples.png``: a grid of digits ``(N, 28, 28)`` (uint8 or float) with their labels."""
    n = images.shape[0]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.45 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            ax.imshow(images[k].detach().cpu().float().numpy(), cmap="gray_r")
            ax.set_title(str(int(labels[k])), fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
