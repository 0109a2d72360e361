"""Plots (matplotlib, written as PNG files; no display needed), and :class:`RunPlots`, the callback that
draws a run's. Figures are ``matplotlib.figure.Figure``, not pyplot: no backend is chosen, so importing
mnist_lab leaves a notebook's inline plots (and any GUI backend) as they were. The sweep plots take
configurations as :func:`mnist_lab.results.aggregate` makes them (a row each: ``label``, ``n``,
``architecture``, the overrides, per value its mean, ``"<value> std"`` and ``"<value> n"``).
"""

import math
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mnist_lab.rundir import RunDir, column, group_history, read_history

UNITS = {"rotation": "degrees", "translation": "pixels", "zoom": "scale factor", "noise": "noise std",
         "elastic": "alpha (px)"}


class RunPlots(L.Callback):
    """A run's figures, by rank 0: ``samples.png`` (the first 25 training digits) when fit starts (a
    resumed run keeps its own), ``curves.png`` and, where the history holds the learning dynamics,
    ``dynamics.png`` when fit ends."""

    def __init__(self, run_dir: str | Path, resuming: bool = False):
        self.run, self.resuming = RunDir(run_dir), resuming

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and not self.resuming:
            x, y = trainer.datamodule.splits["train"]
            plot_samples(x[:25], y[:25], self.run.path / "samples.png", title="first 25 training digits")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        history, name = read_history(self.run.history), getattr(pl_module, "name", type(pl_module).__name__)
        if trainer.is_global_zero and {"train/loss", "val/loss"} & set(history):
            plot_curves(history, self.run.path / "curves.png", title=name)
        if trainer.is_global_zero and "dynamics/grad_norm" in history:
            plot_dynamics(history, self.run.path / "dynamics.png", title=name)


def _figure(width: float, height: float, *grid, **kwargs):
    fig = Figure(figsize=(width, height))
    return fig, fig.subplots(*grid, **kwargs)


def _axes(ax, xlabel: str, ylabel: str, integer: bool = True, **kwargs) -> None:
    ax.set(xlabel=xlabel, ylabel=ylabel, **kwargs)
    if integer:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3, which="both")


def _save(fig: Figure, path: str | Path, title: str) -> Path:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_curves(history: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """``curves.png`` of a run's history (:func:`~mnist_lab.rundir.read_history`): train and val loss (left)
    and top-1 accuracy (right) per epoch."""
    epochs, (fig, axes) = group_history(history, "epoch"), _figure(10, 3.8, 1, 2)
    for ax, metric in zip(axes, ("loss", "acc")):
        for split, style in (("train", "o-"), ("val", "s--")):
            if len(values := column(epochs, f"{split}/{metric}")):
                ax.plot(values.index + 1, values.to_numpy(), style, label=split)
        _axes(ax, "epoch", "cross-entropy loss" if metric == "loss" else "top-1 accuracy")
        ax.legend()
    return _save(fig, path, title)


def plot_dynamics(history: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """``dynamics.png`` of a run's history with the :class:`~mnist_lab.callbacks.Dynamics` records: the
    training loss (per record) and the validation loss (per validation) against optimizer steps; the global
    gradient norm; the update ratio ``||dw|| / ||w||`` of each layer (all three log y); the generalisation
    gap (train minus val top-1 accuracy) per epoch."""
    steps, epochs = group_history(history, "step"), group_history(history, "epoch")
    fig, ((loss, grad), (ratio, gap)) = _figure(12, 8, 2, 2)
    for ax, metric, style, label in ((loss, "dynamics/train_loss", "-", "train (per record)"),
                                     (loss, "val/loss", "s--", "val"), (grad, "dynamics/grad_norm", "-", None),
                                     *((ratio, k, "-", k.removeprefix("update_ratio/"))
                                       for k in sorted(k for k in steps if k.startswith("update_ratio/")))):
        if len(series := column(steps, metric)):
            ax.plot(series.index + 1, series.to_numpy(), style, label=label)
    for ax, ylabel in ((loss, "cross-entropy loss"), (grad, "gradient norm (L2, all parameters)"),
                       (ratio, "update ratio ||dw|| / ||w||")):
        _axes(ax, "optimizer step", ylabel, integer=False, yscale="log")
    loss.legend()
    ratio.legend(fontsize=7, ncol=2)
    diff = (column(epochs, "train/acc") - column(epochs, "val/acc")).dropna()
    gap.plot(diff.index + 1, diff.to_numpy(), "o-")
    gap.axhline(0, color="grey", lw=0.8)
    _axes(gap, "epoch", "train - val top-1 accuracy")
    return _save(fig, path, title)


def plot_confusion_matrix(confusion: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """``confusion_matrix.png``: counts ``(C, C)``, rows = true class, columns = predicted class. Cells are
    coloured by the row-normalised rate and labelled with counts."""
    cm = confusion.detach().cpu().to(torch.int64)
    rate, (fig, ax) = cm.double() / cm.sum(1, keepdim=True).clamp_min(1), _figure(6.4, 5.6)
    im = ax.imshow(rate.numpy(), cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(cm.numpy()):
        if count:
            ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                    color="white" if rate[i, j] > 0.5 else "black")
    ax.set(xticks=range(len(cm)), yticks=range(len(cm)), xlabel="predicted class", ylabel="true class")
    fig.colorbar(im, ax=ax, label="fraction of true class")
    return _save(fig, path, title)


def _digits(images: torch.Tensor, titles: list[str], path: str | Path, title: str, cols: int, cell: tuple) -> Path:
    """A grid of digits ``(N, 28, 28)`` (uint8 or float), each with its title; ``cell``: inches a digit."""
    rows = math.ceil(max(len(titles), 1) / cols)
    fig, axes = _figure(cell[0] * cols, cell[1] * rows, rows, cols, squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < len(titles):
            ax.imshow(images[k].detach().cpu().float().numpy(), cmap="gray_r")
            ax.set_title(titles[k], fontsize=9 if "\n" not in titles[k] else 7)
    return _save(fig, path, title)


def plot_samples(images: torch.Tensor, labels: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """``samples.png``: a grid of digits ``(N, 28, 28)`` (uint8 or float) with their labels."""
    return _digits(images, [str(int(y)) for y in labels], path, title, math.ceil(math.sqrt(len(labels))), (1.3, 1.45))


def plot_gallery(images: torch.Tensor, labels: torch.Tensor, probs: torch.Tensor, path: str | Path,
                 title: str = "") -> Path:
    """A grid of digits ``(N, 28, 28)``, each titled with its true label and top-3 probabilities
    (``errors.png``, ``predictions.png``)."""
    titles = [f"true {int(y)}\n" + " ".join(f"{int(c)}:{float(v):.2f}" for v, c in zip(*p.topk(3)))
              for y, p in zip(labels, probs)]
    return _digits(images, titles, path, title, min(max(len(titles), 1), 5), (2.0, 2.3))


def plot_acc_vs_params(groups: pd.DataFrame, path: str | Path, title: str = "",
                       reference: list[tuple[float, float]] | None = None, front: pd.DataFrame | None = None,
                       x: str = "params_trainable", records: list[dict] | None = None) -> Path:
    """``acc_vs_params.png``: mean test accuracy vs trainable parameters (``x="flops_per_image"``: vs
    forward FLOPs per image, ``acc_vs_flops.png``), log x, error bars = std over seeds, one labelled
    point per configuration, one marker per ``architecture`` (the network's class); ``reference``
    ``(x, accuracy)`` points (e.g. published results) are drawn as crosses, ``front`` (the Pareto-front
    configurations) as a dashed line, ``records`` (``{"label", "x", "mean", "std"}``: presets trained with
    their own recipes) as stars."""
    fig, ax = _figure(8, 5)
    markers = dict(zip(dict.fromkeys(groups["architecture"].fillna("")), "osD^vP*hX"))
    for _, g in groups.iterrows():
        arch = g["architecture"] if isinstance(g["architecture"], str) else ""
        ax.errorbar(g[x], g["test/acc"], yerr=g["test/acc std"], fmt=markers.get(arch, "o"), capsize=3,
                    label=arch or None)
        ax.annotate(f"{g['label']} (n={g['n']})", (g[x], g["test/acc"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=7)
    if front is not None and len(front) > 1:
        ax.plot(front[x], front["test/acc"], "k--", lw=1, label="Pareto front")
    if reference:
        ax.plot(*zip(*reference), "kx", ms=8, label="published")
    for r in records or []:
        ax.errorbar(r["x"], r["mean"], yerr=r["std"], fmt="*", ms=11, color="crimson", capsize=3,
                    label="record presets (own recipes)")
        ax.annotate(r["label"], (r["x"], r["mean"]), textcoords="offset points", xytext=(6, -10), fontsize=7,
                    color="crimson")
    if unique := dict(zip(*ax.get_legend_handles_labels()[::-1])):
        ax.legend(unique.values(), unique.keys(), fontsize=8)
    _axes(ax, "FLOPs per image, forward pass (log scale)" if x == "flops_per_image" else
          "trainable parameters (log scale)", "test top-1 accuracy (mean ± std over seeds)", False, xscale="log")
    return _save(fig, path, title)


def plot_val_curves(curves: dict[str, pd.DataFrame], path: str | Path, title: str = "") -> Path:
    """``val_curves.png``: val accuracy (left) and val loss (right) per epoch, one line per configuration;
    ``curves``: label -> its mean over seeds, indexed by 0-based epoch, columns ``val/acc`` and ``val/loss``."""
    fig, axes = _figure(11, 4.2, 1, 2)
    for ax, metric, ylabel in zip(axes, ("val/acc", "val/loss"), ("val top-1 accuracy", "val cross-entropy loss")):
        for name, curve in curves.items():
            if metric in curve:
                ax.plot(curve.index + 1, curve[metric].to_numpy(), "o-", ms=3, label=name)
        _axes(ax, "epoch", ylabel)
    axes[0].legend(fontsize=7)
    return _save(fig, path, title)


def plot_run_curves(runs: dict[str, list[pd.Series]], metric: str, path: str | Path, title: str = "",
                    log: bool = True, x: str = "epoch") -> Path:
    """``runs_<metric>.png``: ``metric`` for every run (one thin line a seed), one colour per configuration;
    log scale by default, so a collapsed run does not flatten the others. ``runs``: configuration label ->
    one series per run, indexed by 0-based epoch (or, ``x="optimizer step"``, 0-based step)."""
    fig, ax = _figure(7.5, 4.5)
    for i, (name, curves) in enumerate(runs.items()):
        for j, curve in enumerate(curves):
            ax.plot(curve.index + 1, curve.to_numpy(), "o-" if x == "epoch" else "-", ms=2.5, lw=1, alpha=0.8,
                    color=f"C{i % 10}", label=name if j == 0 else None)
    _axes(ax, x, f"{metric} (every run{', log scale' if log else ''})", yscale="log" if log else "linear")
    ax.legend(fontsize=7)
    return _save(fig, path, title)


def plot_train_val_gap(groups: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """``train_val_gap.png``: last-epoch train accuracy minus val accuracy per configuration (train
    accuracy is measured in train mode, i.e. with dropout and augmentation on)."""
    fig, ax = _figure(8, 0.45 * len(groups) + 1.5)
    ax.barh(range(len(groups)), groups["gap"], xerr=groups["gap std"], capsize=3)
    ax.set_yticks(range(len(groups)), groups["label"], fontsize=8)
    ax.axvline(0, color="black", lw=0.8)
    ax.set(xlabel="train acc - val acc, last epoch (mean ± std over seeds)", ylim=ax.get_ylim()[::-1])
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path, title)


def plot_heatmap(groups: pd.DataFrame, key_x: str, key_y: str, path: str | Path, title: str = "") -> Path:
    """``heatmap.png``: mean test accuracy over a 2-factor grid (``key_x`` columns, ``key_y`` rows)."""
    grid = groups.pivot_table(index=key_y, columns=key_x, values="test/acc", aggfunc="first")
    fig, ax = _figure(1.4 * grid.shape[1] + 2.5, 1.0 * grid.shape[0] + 1.8)
    im = ax.imshow(values := grid.to_numpy(dtype=float), cmap="viridis")
    for (i, j), acc in np.ndenumerate(values):
        if not math.isnan(acc):
            ax.text(j, i, f"{acc:.4f}", ha="center", va="center", color="white", fontsize=9)
    ax.set(xticks=range(grid.shape[1]), xticklabels=grid.columns, yticks=range(grid.shape[0]),
           yticklabels=grid.index, xlabel=key_x, ylabel=key_y)
    fig.colorbar(im, ax=ax, label="mean test top-1 accuracy")
    return _save(fig, path, title)


def plot_robustness(results: dict[str, dict[str, dict[str, float]]], path: str | Path, title: str = "") -> Path:
    """``robustness.png``: accuracy vs perturbation strength, one panel per perturbation, one line
    per model: ``results = {model label: {kind: {strength: accuracy}}}`` (an overlay for several)."""
    kinds = list(next(iter(results.values())))
    fig, axes = _figure(3.3 * len(kinds), 3.4, 1, len(kinds), sharey=True, squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for name, res in results.items():
            if kind in res:
                ax.plot([float(s) for s in res[kind]], list(res[kind].values()), "o-", ms=3, label=name)
        ax.set(title=kind, xlabel=UNITS.get(kind, "strength"))
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("test top-1 accuracy")
    axes[0, -1].legend(fontsize=7)
    return _save(fig, path, title)


def plot_reliability(bins: list[dict], path: str | Path, title: str = "") -> Path:
    """``calibration.png``: reliability diagram (accuracy vs mean confidence per confidence bin, bar
    width = bin) and the share of images per bin."""
    fig, (ax, ax2) = _figure(5.2, 6, 2, 1, height_ratios=[3, 1], sharex=True)
    full, width = [b for b in bins if b["count"]], bins[0]["upper"] - bins[0]["lower"]
    total = sum(b["count"] for b in bins)
    ax.bar([b["lower"] for b in full], [b["accuracy"] for b in full], width=width, align="edge",
           edgecolor="black", alpha=0.8, label="accuracy")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.plot([b["confidence"] for b in full], [b["accuracy"] for b in full], "r.", label="mean confidence")
    ax.set_ylabel("accuracy in bin")
    ax.legend(fontsize=8)
    ax2.bar([b["lower"] for b in bins], [b["count"] / max(total, 1) for b in bins], width=width, align="edge")
    ax2.set(yscale="log", xlabel="confidence (max softmax probability)", ylabel="share")
    return _save(fig, path, title)


def plot_isolation(trials: pd.DataFrame, path: str | Path, title: str = "", metric: str = "best_val/acc") -> Path:
    """``isolation.png`` (Google's Deep Learning Tuning Playbook): ``metric`` of every nuisance trial against
    its arm, one column per arm in first-seen order, side by side within it, each point labelled with its
    nuisance values, the chosen trials marked by a star. ``trials``: their jobs table
    (:func:`mnist_lab.results.collect`) with the columns ``arm`` (its name), ``label`` (its nuisance values)
    and ``chosen`` (a boolean)."""
    arms = list(dict.fromkeys(trials["arm"]))
    fig, ax = _figure(max(6.0, 2.2 * len(arms) + 2), 4.5)
    for i, (_, group) in enumerate(trials.groupby("arm", sort=False)):  # in first-seen order, as ``arms``
        for k, (_, t) in enumerate(group.iterrows()):  # side by side, centred on the arm
            x, star = i + 0.18 * (k - (len(group) - 1) / 2), bool(t["chosen"])
            ax.plot(x, float(t[metric]), "*" if star else "o", ms=13 if star else 6, color="crimson" if star else "C0",
                    zorder=3 if star else 2, label="chosen (best validation)" if star else "nuisance trial")
            ax.annotate(t["label"], (x, float(t[metric])), textcoords="offset points", xytext=(6, -3), fontsize=7,
                        rotation=30)
    ax.set_xticks(range(len(arms)), arms, fontsize=8)
    ax.set_xlim(-0.5, len(arms) - 0.5)
    unique = dict(zip(*ax.get_legend_handles_labels()[::-1]))
    ax.legend(unique.values(), unique.keys(), fontsize=8)
    _axes(ax, "arm (scientific value)", f"{metric} of each trial", integer=False)
    return _save(fig, path, title)
