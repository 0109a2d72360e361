"""Errors for bad user input. Each message names the problem and the fix.

The command-line entry points catch :class:`MnistLabError` and print its message without a
traceback (exit code 2); library callers get an ordinary exception they can catch.
"""


class MnistLabError(Exception):
    """Base class: a problem with the user's input (config, data files), not a bug."""


class ConfigError(MnistLabError, ValueError):
    """A config value is out of range or unknown (raised before any training starts)."""


class DataError(MnistLabError, RuntimeError):
    """Dataset files are missing, unreadable or corrupt (raised before any training starts)."""
