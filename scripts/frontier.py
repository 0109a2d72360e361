#!/usr/bin/env python
"""The frontier plots from the committed sweep summary: test accuracy against trainable parameters or FLOPs.

Usage:
  python scripts/frontier.py docs/frontier_summary.csv docs/frontier.png --records docs/records.csv
  python scripts/frontier.py docs/frontier_summary.csv docs/frontier_flops.png --x flops_per_image

A network's forward FLOPs per image depend on its architecture alone, so each row's ``model`` preset
gives them (``Classifier.flops_per_image``: torch's FLOP counter, a multiply-add is 2). The script fills
the ``flops_per_image`` column of the summary (a summary older than that column lacks it) and draws the
mean test accuracy over seeds with the Pareto front (``mnist_lab.results.pareto_front``); ``--records``
adds the record presets (docs/records.csv: one row per seed, their own recipes) as stars.
"""

import argparse
import sys
from pathlib import Path

import pandas as pd

from mnist_lab import Classifier, model_config
from mnist_lab.plots import plot_acc_vs_params
from mnist_lab.results import aggregate, pareto_front, read_summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summary_csv", type=Path)
    parser.add_argument("plot", type=Path)
    parser.add_argument("--x", choices=("params_trainable", "flops_per_image"), default="params_trainable")
    parser.add_argument("--records", type=Path, help="docs/records.csv: the record presets' seeds, drawn as stars")
    args = parser.parse_args()
    jobs = read_summary(args.summary_csv)
    flops = {name: Classifier(model_config(name)).flops_per_image() for name in set(jobs["model"])}
    jobs["flops_per_image"] = jobs["model"].map(flops)  # a summary older than that column lacks it
    if "error" in jobs:
        jobs = jobs[[c for c in jobs if c != "error"] + ["error"]]
    jobs.to_csv(args.summary_csv, index=False, lineterminator="\r\n")
    groups = aggregate(jobs)
    front = pareto_front(groups, cost=args.x)
    records = []
    if args.records:
        seeds = pd.read_csv(args.records)
        for (name, preset, params), runs in seeds.groupby(["record", "preset", "params_trainable"], sort=False):
            cost = params if args.x == "params_trainable" else Classifier(model_config(preset)).flops_per_image()
            low, high, acc = runs["epochs"].min(), runs["epochs"].max(), runs["test_acc"]  # differ: early stopping
            epochs = f"{low}" if low == high else f"{low}-{high}"
            records.append({"label": f"{name} ({preset}, {epochs} ep)", "x": cost, "mean": acc.mean(),
                            "std": acc.std() if len(acc) > 1 else 0.0})
    what = {"params_trainable": "trainable parameters", "flops_per_image": "forward FLOPs per image"}[args.x]
    plot_acc_vs_params(groups, args.plot, title=f"frontier: test accuracy against {what} (3 seeds)", x=args.x,
                       front=front, records=records)
    for _, g in groups.sort_values(args.x).iterrows():
        mark = "  (Pareto front)" if g["label"] in set(front["label"]) else ""
        print(f"{g['label']:<16} {g[args.x]:>13,.0f}  test acc {g['test/acc']:.4f}{mark}")
    print(f"wrote {args.summary_csv} (flops_per_image) and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
