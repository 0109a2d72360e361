"""The run dir (``outputs/runs/<date>_<time>/``, or a sweep's job dir): its layout, and reading it back
(history, summary, checkpoints, safely); :mod:`mnist_lab.record` writes it, atomically.
"""

import contextlib
import datetime as dt
import json
import os
import pickle
import platform
import re
import subprocess
import tempfile
from pathlib import Path

import lightning as L
import pandas as pd
import torch

from mnist_lab._version import __version__
from mnist_lab.errors import ConfigError


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: str | Path, data: dict) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint's contents, loaded safely (``torch.load(weights_only=True)``, tensors memory-mapped):
    a pickle that would call Python code is refused before any of it runs.

    Raises:
        ConfigError: the file is missing, refused (would run code), or not a (whole) PyTorch checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist; give ckpt_path=<run dir>/checkpoints/best.ckpt "
                          "or run_dir=<run dir>")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: weights stay on disk
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):  # torch's safe unpickler refused it: a checkpoint, but unsafe
            code = re.search(r"GLOBAL (\S+)", str(e))
            raise ConfigError(f"refused {path}: loading it would call Python code"
                              f"{f' ({code.group(1)})' if code else ''}, so it was not loaded. It is a PyTorch "
                              "checkpoint, but mnist_lab only loads weights-only ones, such as mnist_lab.train "
                              "writes") from None
        raise ConfigError(f"{path} is not a PyTorch checkpoint; give a .ckpt file written by mnist_lab.train") from None
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else ""
        raise ConfigError(f"{path} is not a PyTorch checkpoint, or it is truncated ({type(e).__name__}: {reason}); "
                          "give a whole .ckpt file written by mnist_lab.train") from None
    if not isinstance(ckpt, dict):
        raise ConfigError(f"{path} is not a Lightning checkpoint (it holds a {type(ckpt).__name__}, not a dict)")
    return ckpt


def read_history(metrics_csv: str | Path, by: str | None = None) -> pd.DataFrame:
    """``metrics.csv`` as Lightning's CSVLogger wrote it, one row per logging call (columns ``epoch``,
    ``step`` and one per metric; values exact), or grouped ``by`` epoch or step (:func:`group_history`).
    Empty when there is no file (a run that logged nothing). The one reader of a run's history."""
    try:
        history = pd.read_csv(metrics_csv, engine="python")  # Python's float(): values exact
    except (FileNotFoundError, pd.errors.EmptyDataError):
        history = pd.DataFrame(columns=["epoch", "step"], dtype=float)
    return history if by is None else group_history(history, by)


def column(frame: pd.DataFrame, name: str) -> pd.Series:
    """A history's column without its empty rows (empty if the run did not log it)."""
    return frame[name].dropna() if name in frame else pd.Series(dtype=float)


def group_history(history: pd.DataFrame, by: str) -> pd.DataFrame:
    """One row per epoch (``by="epoch"``) or per 0-based optimizer step (``"step"``), indexed by it; a
    metric logged several times in one keeps its last value."""
    grouped = history.dropna(subset=[by]).groupby(by).last()
    return grouped.drop(columns=[c for c in ("epoch", "step") if c in grouped]).set_axis(grouped.index.astype(int))


def provenance(device: torch.device) -> dict:
    """What a reader needs to reproduce a run: the versions of mnist_lab, torch, Lightning and Python, the
    git commit of the clone mnist_lab runs from (None from a wheel) and whether it had uncommitted changes
    (``git_dirty``), and the device's name (the GPU's, or the CPU model)."""
    clone, commit, status = Path(__file__).resolve().parents[1], None, None
    if (clone / ".git").exists():
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            commit, status = (subprocess.run(["git", "-C", str(clone), *args], capture_output=True, text=True,
                                             timeout=30, check=True).stdout.strip()
                              for args in (["rev-parse", "HEAD"], ["status", "--porcelain", "--untracked-files=no"]))
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), None) if Path("/proc/cpuinfo").is_file() else None
    return {"mnist_lab_version": __version__, "git_commit": commit,
            "git_dirty": None if status is None else bool(status), "torch_version": torch.__version__,
            "lightning_version": L.__version__,
            "python_version": platform.python_version(), "device_name": torch.cuda.get_device_name(device)
            if device.type == "cuda" else cpu or platform.processor() or platform.machine()}


def given_checkpoints(ckpt_path, run_dir) -> list[Path]:
    """The checkpoints a command was given: ``ckpt_path`` (a file, or a list of them), or ``run_dir`` (a
    run dir, or a list: the checkpoint each run's test metrics came from).

    Raises:
        ConfigError: both or neither given.
    """
    if bool(ckpt_path) == bool(run_dir):
        raise ConfigError("give exactly one of ckpt_path=<file.ckpt> or run_dir=<run dir> (or a list of either)")
    given = [run_dir or ckpt_path] if isinstance(run_dir or ckpt_path, str | Path) else list(run_dir or ckpt_path)
    return [RunDir(r).tested_checkpoint() for r in given] if run_dir else [Path(p) for p in given]


def sweep_root(path: Path) -> Path | None:
    """The outermost dir at or above ``path`` that holds a sweep (``multirun.yaml``): what ``-m resume=``
    continues (a study's, for its nuisance trials); None: no sweep."""
    return next((p for p in [*reversed(path.absolute().parents), path.absolute()] if (p / "multirun.yaml").is_file()),
                None)


def check_writable(folder: str | Path, what: str = "run dir", key: str = "hydra.run.dir=... (or output_dir)") -> None:
    """Make ``folder`` if missing and check that files can be created in it.

    Raises:
        ConfigError: it cannot be written; the message names the OS's reason and the setting ``key``.
    """
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ConfigError(f"cannot write the {what} {folder}: {e.strerror or type(e).__name__}; "
                          f"choose a writable {key}") from None


class RunDir:
    """One run dir: where each of its files is (``RunDir(path).metrics`` is ``path/metrics.json``), and
    reading and writing its summary."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def new(cls, base: str | Path = "outputs/runs") -> "RunDir":
        """A fresh, timestamped run dir (to the microsecond, so two runs never share one)."""
        return cls(Path(base) / dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f"))

    config = property(lambda self: self.path / "config.yaml", doc="the resolved config of the run")
    metrics = property(lambda self: self.path / "metrics.json", doc="the run's summary and status")
    history = property(lambda self: self.path / "metrics.csv", doc="per-epoch metrics (Lightning's CSVLogger)")
    checkpoints = property(lambda self: self.path / "checkpoints", doc="best.ckpt and last.ckpt")
    evaluation = property(lambda self: self.path / "evaluation.json", doc="the evaluation suite's results")
    robustness = property(lambda self: self.path / "robustness.json", doc="accuracy under perturbations")

    def checkpoint(self, which: str = "last") -> Path:
        """``checkpoints/best.ckpt`` (lowest ``val/loss``) or ``checkpoints/last.ckpt`` (the last epoch)."""
        return self.checkpoints / f"{which}.ckpt"

    def read_metrics(self) -> dict:
        """``metrics.json``, or ``{}`` if there is none (the run is running, or was killed) or it is unreadable."""
        try:
            return json.loads(self.metrics.read_text())
        except (OSError, ValueError):
            return {}

    def tested_checkpoint(self) -> Path:
        """The checkpoint the run's test metrics came from (``best.ckpt`` if the run did not say)."""
        tested = self.read_metrics().get("test_ckpt")
        return self.path / tested if tested else self.checkpoint("best")

    def write_status(self, status: str, error: BaseException | str, **extra) -> None:
        """Record in ``metrics.json`` why a run stopped early (``failed``, ``diverged``, ``interrupted``)
        and the error message; figures an earlier write put there (e.g. test metrics) are kept."""
        error = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            write_json(self.metrics, {**self.read_metrics(), "status": status, "error": error, **extra,
                                      "run_dir": str(self.path)})
        except OSError:
            pass  # the run dir itself is not writable: the message on stderr is all there is

    def check(self, resuming: bool = False) -> None:
        """Check that a new run may start here (no earlier run's files), or that a run may resume here (the
        dir exists), and that it is writable.

        Raises:
            ConfigError: an earlier run is there (a new run never overwrites one), no such dir to resume in,
                or it cannot be written.
        """
        if resuming and not self.path.is_dir():
            raise ConfigError(f"resume={self.path}: there is no such run dir")
        found = next((p.name for p in (self.config, self.metrics, self.history, self.checkpoints) if p.exists()), None)
        if found and not resuming:
            raise ConfigError(f"the run dir {self.path} already holds a run ({found}), and a new run never overwrites "
                              f"one: continue it with resume={self.path}, or start in a new dir (leave hydra.run.dir / "
                              "output_dir out for a fresh outputs/runs/<date>_<time>)")
        check_writable(self.path)
