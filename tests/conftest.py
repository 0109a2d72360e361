"""Shared helpers and fixtures: the commands run in this process (:func:`cli`) or, where a process of
their own is the point (SIGKILL, DDP, a sweep that relaunches itself), in a subprocess (:func:`run_module`);
small synthetic MNIST-format datasets written as IDX files; trained runs shared by the session; the real data."""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

REPO = Path(__file__).resolve().parents[1]
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


class Answer(NamedTuple):
    """What a command line gave: its exit code and what it printed."""

    returncode: int
    stdout: str
    stderr: str


def cli(module: str, *args, data_root=None, cwd=None, env: dict | None = None) -> Answer:
    """``python -m <module> <args>`` run in this process through the command's ``main()``, with
    ``MNIST_LAB_DATA=data_root``, in ``cwd``: its exit code (0, or ``SystemExit``'s; 1 and the traceback
    for an uncaught error, as Python's) and what it printed. A fresh interpreter costs seconds of imports."""
    saved = sys.argv, dict(os.environ), os.getcwd(), signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    os.environ.update({**({"MNIST_LAB_DATA": str(data_root)} if data_root else {}), **(env or {})})
    sys.argv = [module, *map(str, args)]
    out, err = io.StringIO(), io.StringIO()
    try:
        os.chdir(cwd or os.getcwd())
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                importlib.import_module(module).main()
                code = 0
            except SystemExit as e:  # what the command line sees: the exit code
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            except Exception:  # noqa: BLE001 - an uncaught error: Python prints it and exits with 1
                traceback.print_exc(file=err)
                code = 1
    finally:
        sys.argv = saved[0]
        os.environ.clear()
        os.environ.update(saved[1])
        os.chdir(saved[2])
        signal.signal(signal.SIGINT, saved[3])  # Lightning ignores SIGINT once it handled one
        signal.signal(signal.SIGTERM, saved[4])
        GlobalHydra.instance().clear()
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:], root.level = handlers, level
    return Answer(code, out.getvalue(), err.getvalue())


def run_module(module: str, args, data_root, cwd, timeout: int = 600, env: dict | None = None
               ) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` in a subprocess with ``MNIST_LAB_DATA=data_root`` and ``tests/`` on
    ``PYTHONPATH`` (so configs can name ``probes.*`` callbacks); returns the finished process."""
    path = os.pathsep.join(p for p in (str(REPO / "tests"), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "MNIST_LAB_DATA": str(data_root), "PYTHONWARNINGS": "ignore", "PYTHONPATH": path,
           "TQDM_DISABLE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (magic 0x0803 for 3-D images, 0x0801 for 1-D labels)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = (0x0800 + array.ndim).to_bytes(4, "big")
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.tobytes())


def synthetic_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` learnable 28x28 uint8 'digits': class c is a bright 6x6 block at one of 10 positions,
    jittered by up to 1 px, on faint noise. Labels cycle 0..9 so every class has n/10 images."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    rng.shuffle(labels)
    images = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8)
    for i, c in enumerate(labels):
        r, q = 4 + 7 * (c // 4), 3 + 6 * (c % 4)
        dr, dq = rng.integers(-1, 2, size=2)
        images[i, r + dr: r + dr + 6, q + dq: q + dq + 6] = 255
    return images, labels


def write_synthetic_mnist(root: Path, n_train: int = 900, n_test: int = 100, dataset: str = "MNIST") -> Path:
    """Write ``root/<dataset>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``; returns ``root``."""
    raw = root / dataset / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        x, y = synthetic_digits(n, seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", x)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", y)
    return root


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A data root with 900 train + 100 test synthetic images (pooled 80/10/10 = 800/100/100)."""
    return write_synthetic_mnist(tmp_path_factory.mktemp("synthetic"))


def centroid(x: torch.Tensor) -> torch.Tensor:
    """``(B, 2)`` intensity centroid ``(x, y)`` in pixels of images ``(B, C, H, W)``."""
    h, w = x.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype), indexing="ij")
    m = x.sum((1, 2, 3))
    return torch.stack([(x * xs).sum((1, 2, 3)) / m, (x * ys).sum((1, 2, 3)) / m], 1)


def real_data_root() -> Path | None:
    """The real MNIST (``$MNIST_LAB_DATA`` or ``../shared/data`` beside the repo), if present."""
    for root in (os.environ.get("MNIST_LAB_DATA"), REPO.parent / "shared" / "data"):
        if root and (Path(root) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
            return Path(root)
    return None


@pytest.fixture(scope="session")
def real_root() -> Path:
    root = real_data_root()
    if root is None:
        pytest.skip("real MNIST not found (set MNIST_LAB_DATA or put it in ../shared/data)")
    return root


@pytest.fixture(scope="session")
def fc_run(synthetic_root, tmp_path_factory) -> tuple[Path, dict]:
    """A briefly trained fc (2 epochs of 2 batches of 16: above chance, below 100 %) with the whole
    evaluation suite and its plots, tested on its last checkpoint: its run dir and metrics.json. Shared by
    the tests that read a trained run; none of them changes it."""
    from mnist_lab import load_config, train

    out = tmp_path_factory.mktemp("fc_run") / "run"
    cfg = load_config(["model=fc", f"data.root={synthetic_root}", "trainer.max_epochs=2",
                       "trainer.limit_train_batches=2", "data.batch_size=16", "test_ckpt=last", *QUIET])
    return out, train(cfg, out)
