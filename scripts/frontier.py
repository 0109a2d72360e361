#!/usr/bin/env python
"""The frontier plots from the committed sweep summary: test accuracy against trainable parameters or FLOPs.

Usage:
  python scripts/frontier.py docs/frontier_summary.csv docs/frontier.png --records docs/records.csv
  python scripts/frontier.py docs/frontier_summary.csv docs/frontier_flops.png --x flops_per_image

A network's forward FLOPs per image depend on its architecture alone, so each row's ``model`` preset
gives them (``Classifier.flops_per_image``: torch's FLOP counter, a multiply-add is 2). The script fills
the ``flops_per_image`` column of the summary (a summary older than that column lacks it) and draws the
mean test accuracy over seeds with the Pareto front (``mnist_lab.sweep.pareto_front``); ``--records``
adds the record presets (docs/records.csv: one row per seed, their own recipes) as stars.
"""

import argparse
import csv
import statistics
import sys
from pathlib import Path

from mnist_lab import Classifier, model_config
from mnist_lab.plots import plot_acc_vs_params
from mnist_lab.sweep import METRICS, aggregate, pareto_front


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summary_csv", type=Path)
    parser.add_argument("plot", type=Path)
    parser.add_argument("--x", choices=("params_trainable", "flops_per_image"), default="params_trainable")
    parser.add_argument("--records", type=Path, help="docs/records.csv: the record presets' seeds, drawn as stars")
    args = parser.parse_args()
    with open(args.summary_csv, newline="") as f:
        reader = csv.DictReader(f)
        table, columns = list(reader), list(reader.fieldnames or [])
    flops = {name: Classifier(model_config(name)).flops_per_image() for name in {r["model"] for r in table}}
    for r in table:
        r["flops_per_image"] = flops[r["model"]]
    if "flops_per_image" not in columns:
        columns.insert(columns.index("error") if "error" in columns else len(columns), "flops_per_image")
    with open(args.summary_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(table)
    rows = [{"status": r["status"], "architecture": r["architecture"], "factors": {"model": r["model"],
             "seed": r["seed"]}, "history": {}, "robustness": {},
             **{k: float(r[k]) if r.get(k) not in (None, "") else None for k in METRICS}} for r in table]
    groups = aggregate(rows)
    front = pareto_front(groups, cost=args.x)
    records = []
    if args.records:
        with open(args.records, newline="") as f:
            seeds = list(csv.DictReader(f))
        for name in dict.fromkeys(r["record"] for r in seeds):
            acc = [float(r["test_acc"]) for r in seeds if r["record"] == name]
            first = next(r for r in seeds if r["record"] == name)
            cost = int(first["params_trainable"]) if args.x == "params_trainable" else \
                Classifier(model_config(first["preset"])).flops_per_image()
            records.append({"label": f"{name} ({first['preset']}, {first['epochs']} ep)",
                            "x": cost, "mean": statistics.fmean(acc),
                            "std": statistics.stdev(acc) if len(acc) > 1 else 0.0})
    what = {"params_trainable": "trainable parameters", "flops_per_image": "forward FLOPs per image"}[args.x]
    plot_acc_vs_params(groups, args.plot, title=f"frontier: test accuracy against {what} (3 seeds)", x=args.x,
                       front=front, records=records)
    for g in sorted(groups, key=lambda g: g[args.x][0]):
        mark = "  (Pareto front)" if g in front else ""
        print(f"{g['label']:<16} {g[args.x][0]:>13,.0f}  test acc {g['test/acc'][0]:.4f}{mark}")
    print(f"wrote {args.summary_csv} (flops_per_image) and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
