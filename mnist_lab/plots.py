"""Report plots (matplotlib, written as PNG files; no display needed).

Figures are made with ``matplotlib.figure.Figure``, not pyplot: no backend is chosen or needed, so
importing mnist_lab leaves a notebook's inline plots (and any GUI backend) as they were.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mnist_lab.rundir import read_epoch_metrics, read_step_metrics


def plot_curves(metrics_csv: str | Path, path: str | Path, title: str = "") -> Path:
    """``curves.png``: train and val loss (left) and top-1 accuracy (right) per epoch."""
    series = read_epoch_metrics(metrics_csv)
    fig = Figure(figsize=(10, 3.8))
    axes = fig.subplots(1, 2)
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
    return _save(fig, path, title)


def plot_dynamics(metrics_csv: str | Path, path: str | Path, title: str = "") -> Path:
    """``dynamics.png``, from the :class:`~mnist_lab.callbacks.Dynamics` records of ``metrics.csv``: the
    training loss (per record) and the validation loss (per validation) against optimizer steps, log y;
    the global gradient norm, log y; the update ratio ``||dw|| / ||w||`` of each layer, log y; the
    generalisation gap (train minus val top-1 accuracy) per epoch."""
    steps, epochs = read_step_metrics(metrics_csv), read_epoch_metrics(metrics_csv)
    fig = Figure(figsize=(12, 8))
    (loss, grad), (ratio, gap) = fig.subplots(2, 2)

    def line(ax, series: dict[int, float], style: str = "-", label: str | None = None):
        if series:
            ax.plot([s + 1 for s in sorted(series)], [series[s] for s in sorted(series)], style, label=label)

    line(loss, steps.get("dynamics/train_loss", {}), "-", "train (per record)")
    line(loss, steps.get("val/loss", {}), "s--", "val")
    line(grad, steps.get("dynamics/grad_norm", {}))
    for key in sorted(k for k in steps if k.startswith("update_ratio/")):
        line(ratio, steps[key], "-", key.removeprefix("update_ratio/"))
    for ax, ylabel in ((loss, "cross-entropy loss"), (grad, "gradient norm (L2, all parameters)"),
                       (ratio, "update ratio ||dw|| / ||w||")):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    loss.legend()
    ratio.legend(fontsize=7, ncol=2)
    train_acc, val_acc = epochs.get("train/acc", {}), epochs.get("val/acc", {})
    common = sorted(set(train_acc) & set(val_acc))
    gap.plot([e + 1 for e in common], [train_acc[e] - val_acc[e] for e in common], "o-")
    gap.axhline(0, color="grey", lw=0.8)
    gap.set_xlabel("epoch")
    gap.xaxis.set_major_locator(MaxNLocator(integer=True))
    gap.set_ylabel("train - val top-1 accuracy")
    gap.grid(alpha=0.3)
    return _save(fig, path, title)


def plot_confusion_matrix(confusion: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """``confusion_matrix.png``: counts ``(C, C)``, rows = true class, columns = predicted class.
    Cells are coloured by the row-normalised rate and labelled with counts."""
    cm = confusion.detach().cpu().to(torch.int64)
    rate = cm.double() / cm.sum(1, keepdim=True).clamp_min(1)
    c = cm.shape[0]
    fig = Figure(figsize=(6.4, 5.6))
    ax = fig.subplots()
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
    return _save(fig, path, title)


def plot_samples(images: torch.Tensor, labels: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """``samples.png``: a grid of digits ``(N, 28, 28)`` (uint8 or float) with their labels."""
    return _digits(images, [str(int(y)) for y in labels], path, title, math.ceil(math.sqrt(len(labels))), (1.3, 1.45))


def _save(fig: Figure, path: str | Path, title: str) -> Path:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


def _digits(images: torch.Tensor, titles: list[str], path: str | Path, title: str, cols: int, cell: tuple) -> Path:
    """A grid of digits ``(N, 28, 28)`` (uint8 or float), each with its title; ``cell``: inches a digit."""
    rows = math.ceil(max(len(titles), 1) / cols)
    fig = Figure(figsize=(cell[0] * cols, cell[1] * rows))
    for k, ax in enumerate(fig.subplots(rows, cols, squeeze=False).flat):
        ax.axis("off")
        if k < len(titles):
            ax.imshow(images[k].detach().cpu().float().numpy(), cmap="gray_r")
            ax.set_title(titles[k], fontsize=9 if "\n" not in titles[k] else 7)
    return _save(fig, path, title)


# Sweep plots: `groups` are the configurations of mnist_lab.sweep.aggregate: dicts with "label",
# "factors", "n", (mean, std) pairs per metric, "gap" and "curves".
def plot_acc_vs_params(groups: list[dict], path: str | Path, title: str = "",
                       reference: list[tuple[float, float]] | None = None, front: list[dict] | None = None,
                       x: str = "params_trainable", records: list[dict] | None = None) -> Path:
    """``acc_vs_params.png``: mean test accuracy vs trainable parameters (``x="flops_per_image"``: vs
    forward FLOPs per image, ``acc_vs_flops.png``), log x, error bars = std over seeds, one labelled
    point per configuration, one marker per ``architecture`` (the network's class); ``reference``
    ``(x, accuracy)`` points (e.g. published results) are drawn as crosses, and ``front`` (the
    Pareto-front configurations) as a dashed line; ``records`` (``{"label", "x", "mean", "std"}``: presets
    trained with their own recipes, e.g. the record presets) as stars."""
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    markers = dict(zip(dict.fromkeys(g.get("architecture") or "" for g in groups), "osD^vP*hX"))
    for g in groups:
        xv, (y, err) = g[x][0], g["test/acc"]
        arch = g.get("architecture") or ""
        ax.errorbar(xv, y, yerr=err, fmt=markers.get(arch, "o"), capsize=3, label=arch or None)
        ax.annotate(f"{g['label']} (n={g['n']})", (xv, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    if front and len(front) > 1:
        ax.plot([g[x][0] for g in front], [g["test/acc"][0] for g in front], "k--", lw=1,
                label="Pareto front")
    if reference:
        ax.plot(*zip(*reference), "kx", ms=8, label="published")
    for r in records or []:
        ax.errorbar(r["x"], r["mean"], yerr=r["std"], fmt="*", ms=11, color="crimson", capsize=3,
                    label="record presets (own recipes)")
        ax.annotate(r["label"], (r["x"], r["mean"]), textcoords="offset points", xytext=(6, -10), fontsize=7,
                    color="crimson")
    handles, labels = ax.get_legend_handles_labels()
    if labels:
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel({"flops_per_image": "FLOPs per image, forward pass (log scale)"}.get(x, "trainable parameters "
                                                                                        "(log scale)"))
    ax.set_ylabel("test top-1 accuracy (mean ± std over seeds)")
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path, title)


def plot_val_curves(groups: list[dict], path: str | Path, title: str = "") -> Path:
    """``val_curves.png``: val accuracy (left) and val loss (right) per epoch, mean over seeds,
    one line per configuration."""
    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    for g in groups:
        for ax, metric in zip(axes, ("val/acc", "val/loss")):
            curve = g["curves"].get(metric, {})
            if curve:
                ax.plot([e + 1 for e in curve], list(curve.values()), "o-", ms=3, label=g["label"])
    for ax, name in zip(axes, ("val top-1 accuracy", "val cross-entropy loss")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _save(fig, path, title)


def plot_run_curves(runs: dict[str, list[dict[int, float]]], metric: str, path: str | Path, title: str = "",
                    log: bool = True, x: str = "epoch") -> Path:
    """``runs_<metric>.png``: ``metric`` per epoch for every run (one thin line a seed), one colour per
    configuration; log scale by default, so a collapsed run does not flatten the others. ``runs``:
    configuration label -> one ``{epoch (0-based): value}`` per run; ``x="optimizer step"``: keyed by
    0-based step instead (a value per validation or per dynamics record)."""
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    for i, (label, curves) in enumerate(runs.items()):
        for j, curve in enumerate(curves):
            epochs = sorted(curve)
            ax.plot([e + 1 for e in epochs], [curve[e] for e in epochs], "o-" if x == "epoch" else "-", ms=2.5, lw=1,
                    alpha=0.8, color=f"C{i % 10}", label=label if j == 0 else None)
    ax.set_xlabel(x)
    ax.set_ylabel(f"{metric} (every run{', log scale' if log else ''})")
    if log:
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, path, title)


def plot_train_val_gap(groups: list[dict], path: str | Path, title: str = "") -> Path:
    """``train_val_gap.png``: last-epoch train accuracy minus val accuracy per configuration
    (train accuracy is measured in train mode, i.e. with dropout and augmentation on)."""
    fig = Figure(figsize=(8, 0.45 * len(groups) + 1.5))
    ax = fig.subplots()
    labels = [g["label"] for g in groups]
    ax.barh(range(len(groups)), [g["gap"][0] for g in groups], xerr=[g["gap"][1] for g in groups], capsize=3)
    ax.set_yticks(range(len(groups)), labels, fontsize=8)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("train acc - val acc, last epoch (mean ± std over seeds)")
    ax.invert_yaxis()
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path, title)


def plot_heatmap(groups: list[dict], key_x: str, key_y: str, path: str | Path, title: str = "") -> Path:
    """``heatmap.png``: mean test accuracy over a 2-factor grid (``key_x`` columns, ``key_y`` rows)."""
    xs = sorted({g["factors"][key_x] for g in groups if key_x in g["factors"]})
    ys = sorted({g["factors"][key_y] for g in groups if key_y in g["factors"]})
    grid = torch.full((len(ys), len(xs)), float("nan"))
    for g in groups:
        if key_x in g["factors"] and key_y in g["factors"]:
            grid[ys.index(g["factors"][key_y]), xs.index(g["factors"][key_x])] = g["test/acc"][0]
    fig = Figure(figsize=(1.4 * len(xs) + 2.5, 1.0 * len(ys) + 1.8))
    ax = fig.subplots()
    im = ax.imshow(grid.numpy(), cmap="viridis")
    for i in range(len(ys)):
        for j in range(len(xs)):
            if not math.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.4f}", ha="center", va="center", color="white", fontsize=9)
    ax.set_xticks(range(len(xs)), xs)
    ax.set_yticks(range(len(ys)), ys)
    ax.set_xlabel(key_x)
    ax.set_ylabel(key_y)
    fig.colorbar(im, ax=ax, label="mean test top-1 accuracy")
    return _save(fig, path, title)


def plot_robustness(results: dict[str, dict[str, dict[str, float]]], path: str | Path, title: str = "") -> Path:
    """``robustness.png``: accuracy vs perturbation strength, one panel per perturbation, one line
    per model: ``results = {model label: {kind: {strength: accuracy}}}`` (an overlay for several)."""
    kinds = list(next(iter(results.values())))
    units = {"rotation": "degrees", "translation": "pixels", "zoom": "scale factor", "noise": "noise std",
             "elastic": "alpha (px)"}
    fig = Figure(figsize=(3.3 * len(kinds), 3.4))
    axes = fig.subplots(1, len(kinds), sharey=True, squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for label, res in results.items():
            if kind in res:
                xs = [float(s) for s in res[kind]]
                ax.plot(xs, list(res[kind].values()), "o-", ms=3, label=label)
        ax.set_title(kind)
        ax.set_xlabel(units.get(kind, "strength"))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test top-1 accuracy")
    axes[0][-1].legend(fontsize=7)
    return _save(fig, path, title)


def plot_reliability(bins: list[dict], path: str | Path, title: str = "") -> Path:
    """``calibration.png``: reliability diagram (accuracy vs mean confidence per confidence bin,
    bar width = bin) and the share of images per bin."""
    fig = Figure(figsize=(5.2, 6))
    (ax, ax2) = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    full = [b for b in bins if b["count"]]
    width = bins[0]["upper"] - bins[0]["lower"]
    ax.bar([b["lower"] for b in full], [b["accuracy"] for b in full], width=width, align="edge",
           edgecolor="black", alpha=0.8, label="accuracy")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.plot([b["confidence"] for b in full], [b["accuracy"] for b in full], "r.", label="mean confidence")
    ax.set_ylabel("accuracy in bin")
    ax.legend(fontsize=8)
    total = sum(b["count"] for b in bins)
    ax2.bar([b["lower"] for b in bins], [b["count"] / max(total, 1) for b in bins], width=width, align="edge")
    ax2.set_yscale("log")
    ax2.set_xlabel("confidence (max softmax probability)")
    ax2.set_ylabel("share")
    return _save(fig, path, title)


def plot_gallery(images: torch.Tensor, labels: torch.Tensor, probs: torch.Tensor, path: str | Path,
                 title: str = "") -> Path:
    """A grid of digits ``(N, 28, 28)``, each titled with its true label and top-3 probabilities
    (``errors.png``, ``predictions.png``)."""
    titles = [f"true {int(y)}\n" + " ".join(f"{int(c)}:{float(v):.2f}" for v, c in zip(*p.topk(3)))
              for y, p in zip(labels, probs)]
    return _digits(images, titles, path, title, min(max(len(titles), 1), 5), (2.0, 2.3))
