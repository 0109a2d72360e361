#!/usr/bin/env python
"""Summarize a Hydra multirun sweep dir: summary.csv, summary.md and plots (mnist_lab.sweep), and
for a study (+study=NAME) its report.md (mnist_lab.study).

Usage: python scripts/summarize_sweep.py outputs/sweeps/<time>
       python scripts/summarize_sweep.py outputs/studies/depth/<time> --study depth   # today's conf/study text
       python scripts/summarize_sweep.py docs/studies/depth --study depth --from-csv   # from summary.csv alone
Works on a finished, partly failed or unfinished sweep; exits 1 if a job did not complete.
"""

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf

from mnist_lab.results import collect, read_summary
from mnist_lab.study import study_spec, values_of, write_report
from mnist_lab.sweep import write_summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--study", help="take the study node from conf/study/STUDY.yaml instead of the jobs' saved "
                        "configs (a report rewritten after the study's text, names or comparisons changed)")
    parser.add_argument("--from-csv", action="store_true", help="read the jobs from summary.csv, not the job dirs "
                        "(a copied summary, e.g. docs/studies/<name>/; the plots that need run dirs are left out)")
    args = parser.parse_args()
    try:
        spec = study_spec(args.sweep_dir)
        if args.study:
            conf = Path(__file__).resolve().parents[1] / "conf" / "study" / f"{args.study}.yaml"
            spec = OmegaConf.to_container(OmegaConf.load(conf).study)
        table = (read_summary(args.sweep_dir / "summary.csv") if args.from_csv
                 else collect(args.sweep_dir, values_of(spec) if spec else ()))
        result = write_summary(args.sweep_dir, title=f"study: {spec['name']}" if spec else None, table=table)
        report = write_report(args.sweep_dir, spec, result["table"]) if spec else None
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(str(f) for f in [*result["files"], *([report] if report else [])]))
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
