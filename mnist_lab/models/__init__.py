"""Architectures: the :class:`ConvNet` family and its published presets (``conf/model/*.yaml``)."""

from __future__ import annotations

from omegaconf import OmegaConf

from mnist_lab.config import CONF_DIR, instantiate_checked
from mnist_lab.errors import ConfigError
from mnist_lab.models.convnet import ConvNet, count_parameters


def list_presets() -> list[str]:
    """Names of the model presets, i.e. the files ``conf/model/<name>.yaml``."""
    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def build_model(name: str, **overrides) -> ConvNet:
    """Build a preset, optionally changed: ``build_model("conv2", dropout=0.25)``.

    The preset's YAML is the single source of truth, for the CLI (``model=conv2``) and for this.

    Raises:
        ConfigError: unknown preset name, or an override the model rejects.
    """
    path = CONF_DIR / "model" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(list_presets())}")
    cfg = OmegaConf.merge(OmegaConf.load(path), overrides)
    return instantiate_checked(cfg, _convert_="all")


__all__ = ["CONF_DIR", "ConvNet", "build_model", "count_parameters", "list_presets"]
