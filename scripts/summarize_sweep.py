#!/usr/bin/env python
"""Summarize a Hydra multirun sweep dir: summary.csv, summary.md and plots (mnist_lab.sweep).

Usage: python scripts/summarize_sweep.py outputs/sweeps/<time>
Works on a finished, partly failed or unfinished sweep; exits 1 if a job did not complete.
"""

import argparse
import sys

from mnist_lab.sweep import write_summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir")
    args = parser.parse_args()
    try:
        result = write_summary(args.sweep_dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(str(f) for f in result["files"]))
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
