"""The run dir: its layout, its status, and reading results back (one owner for every file name).

A run dir (``outputs/runs/<date>_<time>/``, or a sweep's job dir) holds ``config.yaml`` (the
resolved config), ``checkpoints/{best,last}.ckpt``, ``metrics.csv`` (per epoch, Lightning's
CSVLogger), ``metrics.json`` (the run's summary and its ``status``: ``completed``, ``failed``,
``diverged`` or ``interrupted``), ``evaluation.json`` and ``robustness.json`` (the evaluation
suite), and plots. Files are written atomically (a temp file in the same folder, then
``os.replace``), so a reader (a sweep summary, a resumed run) never sees a half-written file.
Checkpoints are read with ``torch.load(weights_only=True)`` only: a checkpoint is a file from a user.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import pickle
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

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
    """Load a checkpoint file safely: ``torch.load(weights_only=True)`` on the CPU, so a file whose
    pickle would call Python code is refused before any of it runs.

    Raises:
        ConfigError: the file is missing, would run code when loaded, or is not a PyTorch checkpoint
            (not one, or truncated); the message says which.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist; give ckpt_path=<run dir>/checkpoints/best.ckpt "
                          "or run_dir=<run dir>")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        code = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if code:
            raise ConfigError(f"refused {path}: loading it would call Python code ({code.group(1)}), so it was not "
                              "loaded. mnist_lab only loads weights-only checkpoints, such as those mnist_lab.train "
                              "writes") from None
        raise ConfigError(f"{path} is not a PyTorch checkpoint; give a .ckpt file written by mnist_lab.train") from None
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else ""
        raise ConfigError(f"{path} is not a PyTorch checkpoint, or it is truncated ({type(e).__name__}: {reason}); "
                          "give a whole .ckpt file written by mnist_lab.train") from None
    if not isinstance(ckpt, dict):
        raise ConfigError(f"{path} is not a Lightning checkpoint (it holds a {type(ckpt).__name__}, not a dict)")
    return ckpt


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


@dataclass(frozen=True)
class RunDir:
    """One run dir: where each of its files is, and reading/writing its summary.

    ``RunDir(path).metrics`` is ``path/metrics.json``; ``read_metrics()`` returns its contents.
    """

    path: Path

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path))

    @classmethod
    def new(cls, base: str | Path = "outputs/runs") -> RunDir:
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

    def write_metrics(self, metrics: dict) -> None:
        write_json(self.metrics, metrics)

    def write_status(self, status: str, error: BaseException | str, **extra) -> None:
        """Record in ``metrics.json`` why a run stopped early (``failed``, ``diverged``, ``interrupted``)
        and the error message; figures an earlier write put there (e.g. test metrics) are kept."""
        error = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.write_metrics({**self.read_metrics(), "status": status, "error": error, **extra,
                                "run_dir": str(self.path)})
        except OSError:
            pass  # the run dir itself is not writable: the message on stderr is all there is

    def check_new(self) -> None:
        """Check that a new run may start here: no earlier run's files, and writable.

        Raises:
            ConfigError: an earlier run is there (a new run never overwrites one), or it cannot be written.
        """
        found = next((p.name for p in (self.config, self.metrics, self.history, self.checkpoints) if p.exists()), None)
        if found:
            raise ConfigError(f"the run dir {self.path} already holds a run ({found}), and a new run never overwrites "
                              f"one: continue it with resume={self.path}, or start in a new dir (leave hydra.run.dir / "
                              "output_dir out for a fresh outputs/runs/<date>_<time>)")
        check_writable(self.path)
