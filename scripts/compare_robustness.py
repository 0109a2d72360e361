#!/usr/bin/env python
"""Overlay the robustness curves of several runs and print their accuracy at chosen strengths.

Usage:
  python scripts/compare_robustness.py RUN_DIR [RUN_DIR ...] --labels "conv2" "conv2 +aug" \\
      --out docs/robustness_conv2_aug.png

Each run dir needs the robustness.json that mnist_lab.train (eval.full=true) or mnist_lab.evaluate
writes; runs evaluated with the same seed saw the same perturbed images.
"""

import argparse
import json
import sys
from pathlib import Path

from mnist_lab.plots import plot_robustness

POINTS = (("rotation", "20", "20° rotation"), ("translation", "4", "4 px shift"), ("rotation", "0", "clean"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument("--labels", nargs="+", help="one label per run dir (default: the dir names)")
    parser.add_argument("--out", default="robustness_comparison.png")
    args = parser.parse_args()
    labels = args.labels or [Path(d).name for d in args.run_dirs]
    if len(labels) != len(args.run_dirs):
        print("error: give one --labels entry per run dir", file=sys.stderr)
        return 2
    results, seeds = {}, set()
    for label, run in zip(labels, args.run_dirs):
        path = Path(run) / "robustness.json"
        if not path.is_file():
            print(f"error: {path} not found; run python -m mnist_lab.evaluate run_dir={run}", file=sys.stderr)
            return 2
        data = json.loads(path.read_text())
        results[label], _ = data["accuracy"], seeds.add(data["seed"])
    if len(seeds) > 1:
        print(f"warning: the runs were evaluated with different seeds {sorted(seeds)}", file=sys.stderr)
    plot_robustness(results, args.out, title="test accuracy under perturbation")
    print("| run | " + " | ".join(p[2] for p in POINTS) + " |")
    print("| --- |" + " ---: |" * len(POINTS))
    for label, res in results.items():
        print(f"| {label} | " + " | ".join(f"{res[k][s]:.4f}" for k, s, _ in POINTS) + " |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
