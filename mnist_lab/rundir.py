"""The run dir: its layout and status, its history logger, reading results back, and safe loading.

A run dir (``outputs/runs/<date>_<time>/``, or a sweep's job dir) holds ``config.yaml``,
``checkpoints/{best,last}.ckpt``, ``metrics.csv`` (the history), ``metrics.json`` (the summary and its
``status``: ``completed``, ``failed``, ``diverged`` or ``interrupted``), the evaluation suite's files and
plots. Files are written atomically (temp file, ``os.replace``): a reader never sees half a file.
Checkpoints are read with ``torch.load(weights_only=True)`` only: a checkpoint is a file from a user.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import pickle
import platform
import re
import subprocess
import tempfile
from collections import defaultdict
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

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


def read_epoch_metrics(metrics_csv: str | Path) -> dict[str, dict[int, float]]:
    """Read Lightning's ``CSVLogger`` file into ``{metric: {epoch: value}}`` (epoch-level rows only; a
    metric logged several times an epoch keeps its last value); ``{}`` when there is no file (a run that
    logged nothing, e.g. ``trainer.max_epochs=0``)."""
    return _series(metrics_csv, "epoch")


def read_step_metrics(metrics_csv: str | Path) -> dict[str, dict[int, float]]:
    """Read ``metrics.csv`` into ``{metric: {step: value}}``, every row (``step``: the 0-based index of the
    last optimizer step the value covers, as Lightning writes it); ``{}`` when there is no file."""
    return _series(metrics_csv, "step")


def _series(metrics_csv: str | Path, by: str) -> dict[str, dict[int, float]]:
    series: dict[str, dict[int, float]] = defaultdict(dict)
    if not Path(metrics_csv).is_file():
        return {}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            if row.get(by) in ("", None):
                continue
            index = int(float(row[by]))
            for key, value in row.items():
                if key not in ("epoch", "step") and value not in ("", None):
                    series[key][index] = float(value)
    return dict(series)


def provenance(device: torch.device) -> dict:
    """What a reader needs to reproduce a run: the versions of mnist_lab, torch, Lightning and Python, the
    git commit of the clone mnist_lab runs from (None from a wheel) and whether it had uncommitted changes
    (``git_dirty``), and the device's name (the GPU's, or the CPU model)."""
    clone, commit, dirty = Path(__file__).resolve().parents[1], None, None
    if (clone / ".git").exists():
        try:
            def git(*args: str) -> str:
                return subprocess.run(["git", "-C", str(clone), *args], capture_output=True, text=True, timeout=30,
                                      check=True).stdout.strip()
            commit, dirty = git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
        except (OSError, subprocess.SubprocessError):
            pass
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
        name = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                    platform.processor() or platform.machine())
    return {"mnist_lab_version": __version__, "git_commit": commit, "git_dirty": dirty,
            "torch_version": torch.__version__, "lightning_version": L.__version__,
            "python_version": platform.python_version(), "device_name": name}


class _ContinuedHistory(ExperimentWriter):
    """Lightning's CSV writer, keeping an existing ``metrics.csv`` and its columns (the stock one deletes it)."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])


class RunCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger`` for a run's ``metrics.csv``, continued by a resumed run instead of
    deleted. :meth:`keep_epochs` drops the rows logged after the checkpoint a run resumes from."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedHistory(log_dir=self.log_dir)
        return self._experiment

    def keep_epochs(self, last: int) -> None:
        """Keep the rows of epochs ``<= last`` and the rows without an epoch (the learning rate, logged as
        an epoch starts) up to their last step; the resumed run logs the others again."""
        path = Path(self.log_dir) / ExperimentWriter.NAME_METRICS_FILE
        if not path.is_file():
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows, keys = list(reader), reader.fieldnames or []
        kept = [r for r in rows if r["epoch"] and int(float(r["epoch"])) <= last]
        last_step = max((int(float(r["step"])) for r in kept), default=-1)
        rows = [r for r in rows if r in kept or (not r["epoch"] and int(float(r["step"])) <= last_step)]
        table = io.StringIO()
        writer = csv.DictWriter(table, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(path, table.getvalue())


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
