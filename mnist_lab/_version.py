"""The version of mnist_lab: the one place it is written (``pyproject.toml`` reads it; CHANGELOG.md)."""

__version__ = "0.3.0"
