#!/usr/bin/env python
"""The README's "published results" table and plot, from a `+sweep=published` sweep dir.

Usage:
  python -m mnist_lab.train +sweep=published hydra.sweep.dir=outputs/sweeps/published   # ~25 min, 2 cores
  python scripts/report_published.py outputs/sweeps/published

Writes docs/published_results.md (the table: ours as mean ± std over seeds next to the published
value) and docs/published_acc_vs_params.png (ours with error bars, published values as crosses).
The published values come from each experiment's config (conf/experiment/published_*.yaml).
"""

import argparse
import sys
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from mnist_lab.plots import plot_acc_vs_params
from mnist_lab.results import aggregate, collect

DOCS = Path(__file__).resolve().parents[1] / "docs"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", nargs="?", default="outputs/sweeps/published")
    parser.add_argument("--out", default=str(DOCS), help="folder for the table and plot (default: docs/)")
    args = parser.parse_args()
    sweep, out = Path(args.sweep_dir), Path(args.out)
    jobs = collect(sweep)
    if jobs.empty:
        print(f"error: no jobs under {sweep}", file=sys.stderr)
        return 2
    published = {}
    for job, experiment in zip(jobs["job"], jobs["experiment"]):  # the published figures: each job's config
        config = sweep / job / "config.yaml"
        published.setdefault(experiment, OmegaConf.select(OmegaConf.load(config), "published") or {}
                             if config.is_file() else {})
    multirun = OmegaConf.load(sweep / "multirun.yaml") if (sweep / "multirun.yaml").is_file() else {}
    listed = str((OmegaConf.select(multirun, "hydra.sweeper.params") or {}).get("+experiment", "")).split(",")
    groups = aggregate(jobs).sort_values("experiment", key=lambda e: e.map(  # conf/sweep/published.yaml's order
        lambda x: listed.index(x) if x in listed else len(listed)), kind="stable")
    groups["published"] = groups["experiment"].map(lambda e: published.get(e, {}).get("test_acc"))

    lines = ["| experiment | trainable params | published test acc | ours: test acc (mean ± std) | n | "
             "ours − published | ours: macro-F1 | epochs run |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for _, g in groups.iterrows():
        pub = g["published"]
        shown = f"{pub:.4f}" if pd.notna(pub) else published.get(g["experiment"], {}).get("note", "–")
        diff = f"{g['test/acc'] - pub:+.4f}" if pd.notna(pub) and pd.notna(g["test/acc"]) else "–"
        lines.append(f"| {g['experiment']} | {g['params_trainable']:,.0f} | {shown} | {g['test/acc']:.4f} ± "
                     f"{g['test/acc std']:.4f} | {g['n']} | {diff} | {g['test/f1_macro']:.4f} | {g['epochs']:.1f} |")
    failed = jobs[jobs["status"] != "completed"]
    if len(failed):
        lines.append(f"\n{len(failed)} jobs did not complete: " + ", ".join(failed["job"]))
    out.mkdir(parents=True, exist_ok=True)
    table = "\n".join(lines) + "\n"
    (out / "published_results.md").write_text(table)
    reference = list(groups.dropna(subset=["published"])[["params_trainable", "published"]].itertuples(index=False))
    plot_acc_vs_params(groups.assign(label=groups["experiment"].str.removeprefix("published_")),
                       out / "published_acc_vs_params.png", reference=[tuple(r) for r in reference],
                       title="mnist_lab (mean ± std over seeds) vs published results")
    print(table)
    print(f"wrote {out / 'published_results.md'} and {out / 'published_acc_vs_params.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
