"""Execute the notebooks in ``notebooks/`` top to bottom with nbclient and save executed copies.

    MNIST_LAB_DATA=../shared/data python scripts/run_notebooks.py        # all three, in full, real data
    MNIST_LAB_QUICK=1 python scripts/run_notebooks.py 01_baseline        # a few batches (as the tests)

The executed copies, with their outputs, go to ``outputs/notebooks/<name>.ipynb``; the committed
notebooks stay without outputs. The kernel runs in the repository root with this process's
environment (``MNIST_LAB_DATA``, ``MNIST_LAB_QUICK``, ``MNIST_LAB_OUTPUTS``, ``MNIST_LAB_SWEEP``).
A cell that raises stops its notebook with nbclient's ``CellExecutionError`` (exit code 1).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def execute(notebook: str | Path, output: str | Path, timeout: int = 3600) -> nbformat.NotebookNode:
    """Run every cell of ``notebook`` in a fresh ``python3`` kernel (``timeout`` seconds per cell), write
    the executed notebook to ``output`` and return it."""
    nb = nbformat.read(notebook, as_version=4)
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, output)
    return nb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="notebook names (default: all), e.g. 01_baseline")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "notebooks"), help="folder for the executed copies")
    args = parser.parse_args()
    chosen = [p for p in NOTEBOOKS if not args.names or p.stem in args.names]
    if args.names and len(chosen) != len(args.names):
        parser.error(f"unknown notebook in {args.names}; there are {[p.stem for p in NOTEBOOKS]}")
    for path in chosen:
        out = execute(path, Path(args.out) / path.name)
        print(f"executed {path.name}: {len(out.cells)} cells -> {Path(args.out) / path.name}")


if __name__ == "__main__":
    main()
