"""Errors for bad user input. Each message names the problem and the fix.

The command-line entry points catch :class:`MnistLabError` and print its message without a
traceback; the exit code is the error's ``exit_code``: 2 for bad input (config, data, checkpoint
files), 3 for a diverged run, 130/143 for a run stopped by SIGINT/SIGTERM. Library callers get an
ordinary exception they can catch.
"""

from __future__ import annotations

import sys
from typing import NoReturn


class MnistLabError(Exception):
    """Base class: a problem with the user's input (config, data files) or the run, not a bug."""

    exit_code = 2


class ConfigError(MnistLabError, ValueError):
    """A config value is out of range or unknown (raised before any training starts)."""


class DataError(MnistLabError, RuntimeError):
    """Dataset files are missing, unreadable or corrupt (raised before any training starts)."""


class TrainingDiverged(MnistLabError, RuntimeError):
    """The training loss became NaN or inf; training stopped before any bad checkpoint was written.

    Attributes: ``epoch``, ``step`` (global step of the check that found it) and ``lr``.
    """

    exit_code = 3

    def __init__(self, message: str, epoch: int, step: int, lr: float):
        super().__init__(message)
        self.epoch, self.step, self.lr = epoch, step, lr


class RunInterrupted(MnistLabError, RuntimeError):
    """A run was stopped by SIGINT (Ctrl-C) or SIGTERM; its last complete epoch is in
    ``checkpoints/last.ckpt`` and ``resume=RUN_DIR`` continues it. ``exit_code``: 128 + the signal
    number (130 for SIGINT, 143 for SIGTERM), the shell's convention."""

    def __init__(self, message: str, signal_name: str):
        super().__init__(message)
        self.signal_name = signal_name
        self.exit_code = 143 if signal_name == "SIGTERM" else 130


def check_rate(key: str, p: float) -> float:
    """A probability of zeroing a unit (a dropout rate) checked to lie in [0, 1); returns it as a float.

    Raises:
        ConfigError: ``p`` outside [0, 1); the message names ``key`` (e.g. ``model.dropout``) and the fix.
    """
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"{key}={p} is outside [0, 1): it is the probability of zeroing a unit; use e.g. "
                          f"{key}=0.25 (0 turns it off)")
    return float(p)


def exit_with(error: MnistLabError) -> NoReturn:
    """The command-line answer to a :class:`MnistLabError`: ``error: <message>`` on stderr, no
    traceback, and the process exits with the error's ``exit_code``."""
    print(f"error: {error}", file=sys.stderr)
    sys.exit(error.exit_code)
