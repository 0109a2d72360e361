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
import math
import sys
from pathlib import Path

from omegaconf import OmegaConf

from mnist_lab.plots import plot_acc_vs_params
from mnist_lab.sweep import aggregate, collect

DOCS = Path(__file__).resolve().parents[1] / "docs"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", nargs="?", default="outputs/sweeps/published")
    parser.add_argument("--out", default=str(DOCS), help="folder for the table and plot (default: docs/)")
    args = parser.parse_args()
    sweep, out = Path(args.sweep_dir), Path(args.out)
    rows = collect(sweep)
    if not rows:
        print(f"error: no jobs under {sweep}", file=sys.stderr)
        return 2
    published = {}
    for r in rows:  # the published figures are in each job's resolved config
        cfg = OmegaConf.load(sweep / r["job"] / "config.yaml") if (sweep / r["job"] / "config.yaml").is_file() else {}
        published.setdefault(r["factors"].get("experiment"), OmegaConf.select(cfg, "published") or {})
    groups = aggregate(rows)
    multirun = OmegaConf.load(sweep / "multirun.yaml") if (sweep / "multirun.yaml").is_file() else {}
    params = OmegaConf.select(multirun, "hydra.sweeper.params") or {}
    listed = str(params.get("+experiment", "")).split(",")
    groups.sort(key=lambda g: listed.index(g["factors"].get("experiment")) if g["factors"].get("experiment")
                in listed else len(listed))  # the order of conf/sweep/published.yaml

    lines = ["| experiment | trainable params | published test acc | ours: test acc (mean ± std) | n | "
             "ours − published | ours: macro-F1 | epochs run |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    reference = []
    for g in groups:
        name = g["factors"].get("experiment", g["label"])
        pub = published.get(name, {})
        (acc, std), params = g["test/acc"], g["params_trainable"][0]
        pub_acc = pub.get("test_acc")
        if pub_acc is not None:
            reference.append((params, pub_acc))
        shown = f"{pub_acc:.4f}" if pub_acc is not None else pub.get("note", "–")
        diff = f"{acc - pub_acc:+.4f}" if pub_acc is not None and not math.isnan(acc) else "–"
        lines.append(f"| {name} | {params:,.0f} | {shown} | {acc:.4f} ± {std:.4f} | {g['n']} | {diff} | "
                     f"{g['test/f1_macro'][0]:.4f} | {g['epochs'][0]:.1f} |")
    failed = [r for r in rows if r["status"] != "completed"]
    if failed:
        lines.append(f"\n{len(failed)} jobs did not complete: " + ", ".join(r["job"] for r in failed))
    out.mkdir(parents=True, exist_ok=True)
    table = "\n".join(lines) + "\n"
    (out / "published_results.md").write_text(table)
    for g in groups:
        g["label"] = g["factors"].get("experiment", g["label"]).removeprefix("published_")
    plot_acc_vs_params(groups, out / "published_acc_vs_params.png", reference=reference,
                       title="mnist_lab (mean ± std over seeds) vs published results")
    print(table)
    print(f"wrote {out / 'published_results.md'} and {out / 'published_acc_vs_params.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
