"""Errors for bad user input, each message naming the problem and the fix, and the checks that raise them.

The command-line entry points print a :class:`MnistLabError` as one ``error:`` line (no traceback) and
exit with its ``exit_code``: 2 for bad input (config, data, checkpoint files), 3 for a diverged run,
130/143 for a run stopped by SIGINT/SIGTERM. Library callers get an ordinary exception.
"""

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
    """The training loss became NaN, inf or too large; no checkpoint of the bad weights was written.
    Attributes: ``epoch``, ``step`` (global step of the check that found it) and ``lr``."""

    exit_code = 3

    def __init__(self, message: str, epoch: int, step: int, lr: float):
        super().__init__(message)
        self.epoch, self.step, self.lr = epoch, step, lr


class RunInterrupted(MnistLabError, RuntimeError):
    """A run stopped by SIGINT (Ctrl-C) or SIGTERM; ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, signal_name: str):
        super().__init__(message)
        self.signal_name = signal_name
        self.exit_code = 143 if signal_name == "SIGTERM" else 130


def check_rate(key: str, p: float, meaning: str = "the probability of zeroing a unit", example: float = 0.25
               ) -> float:
    """A rate (dropout, by default) checked to lie in [0, 1), as a float. Raises ConfigError naming ``key``,
    what the rate means, and the fix."""
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"{key}={p} is outside [0, 1): it is {meaning}; use e.g. {key}={example} (0 turns it off)")
    return float(p)


def check_bool(key: str, value, fix: str = "") -> bool:
    """``value`` checked to be true or false. Raises ConfigError naming ``key`` (``fix``: how to write it)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}{fix or f' (e.g. {key}=true)'}")
    return value


def check_count(key: str, value, minimum: int = 1, example: str = "", fix: str = "") -> int:
    """``value`` checked to be an integer (not a boolean) of at least ``minimum`` (0 or 1). Raises ConfigError
    naming ``key``, an ``example`` and a ``fix``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive" if minimum else "a non-negative"
        raise ConfigError(f"{key}={value!r} must be {kind} integer{f', e.g. {example}' if example else ''}{fix}")
    return value


def check_choice(key: str, value, choices) -> None:
    """Raises ConfigError naming ``key`` and the ``choices`` when ``value`` is not one of them."""
    if value not in choices:
        raise ConfigError(f"unknown {key}={value!r}; choose one of {', '.join(choices)}")


def check_list(key: str, value, example: str) -> list:
    """``value`` checked to be a list (one entry per block or stage), returned as one.
    Raises ConfigError naming ``key`` and an ``example`` of the right form."""
    if isinstance(value, str) or not hasattr(value, "__iter__"):
        raise ConfigError(f"{key}={value!r} must be a list, one entry per block, e.g. {example}")
    return list(value)


def exit_with(error: MnistLabError) -> NoReturn:
    """Print ``error: <message>`` on stderr and exit with the error's ``exit_code``."""
    print(f"error: {error}", file=sys.stderr)
    sys.exit(error.exit_code)
