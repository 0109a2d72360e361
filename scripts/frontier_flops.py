#!/usr/bin/env python
"""The frontier as test accuracy against FLOPs, from a sweep summary that predates ``flops_per_image``.

Usage:
  python scripts/frontier_flops.py docs/frontier_summary.csv docs/frontier_flops.png

A network's forward FLOPs per image depend on its architecture alone, so each row's ``model`` preset
gives them (``Classifier.flops_per_image``: torch's FLOP counter, a multiply-add is 2). The script fills
the ``flops_per_image`` column of the summary (a new run's summary has it already) and draws the mean
test accuracy over seeds against FLOPs with the Pareto front (``mnist_lab.sweep.pareto_front``).
"""

import argparse
import csv
import sys
from pathlib import Path

from mnist_lab import Classifier, model_config
from mnist_lab.plots import plot_acc_vs_params
from mnist_lab.sweep import METRICS, aggregate, pareto_front


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summary_csv", type=Path)
    parser.add_argument("plot", type=Path)
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
    front = pareto_front(groups, cost="flops_per_image")
    plot_acc_vs_params(groups, args.plot, title="frontier: test accuracy against forward FLOPs per image (3 seeds)",
                       x="flops_per_image", front=front)
    for g in sorted(groups, key=lambda g: g["flops_per_image"][0]):
        mark = "  (Pareto front)" if g in front else ""
        print(f"{g['label']:<16} {g['flops_per_image'][0]:>13,.0f} FLOPs  test acc {g['test/acc'][0]:.4f}{mark}")
    print(f"wrote {args.summary_csv} (flops_per_image) and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
