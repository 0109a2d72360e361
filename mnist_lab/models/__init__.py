"""Architectures: the :class:`ConvNet` family (the published presets), :class:`ResNet`,
:class:`DepthwiseNet`, :class:`SeparableNet` and :class:`ViT`, each with presets in ``conf/model/*.yaml``.

A model is any ``nn.Module`` mapping normalised float ``(B, 1, 28, 28)`` images to logits; a preset
is a ``_target_`` config of one. A new architecture is one Python file (here, or anywhere on
``PYTHONPATH``) and one YAML file in ``conf/model/`` (or a folder given by ``hydra.searchpath``).
"""

from omegaconf import OmegaConf
from torch import nn

from mnist_lab.config import CONF_DIR, build, load_config
from mnist_lab.errors import ConfigError
from mnist_lab.models.convnet import ConvNet, count_parameters
from mnist_lab.models.depthwise import DepthwiseNet
from mnist_lab.models.resnet import ResNet
from mnist_lab.models.separable import SeparableNet
from mnist_lab.models.vit import ViT


def list_presets() -> list[str]:
    """Names of the model presets, i.e. the files ``conf/model/<name>.yaml``."""
    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def model_config(name: str, **overrides) -> dict:
    """A preset's ``_target_`` config as a plain dict, optionally changed:
    ``model_config("conv2", dropout=0.25)``. ``Classifier(model_config(...))`` saves it in its
    checkpoints, so ``Classifier.load_from_checkpoint`` rebuilds the network.

    Raises:
        ConfigError: unknown preset name.
    """
    path = CONF_DIR / "model" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(list_presets())}")
    preset = OmegaConf.to_container(load_config([f"model={name}"]).model, resolve=True)  # ${data.num_classes}
    return OmegaConf.to_container(OmegaConf.merge(preset, overrides))


def build_model(name: str, **overrides) -> nn.Module:
    """Build a preset, optionally changed: ``build_model("conv2", dropout=0.25)``.

    The preset's YAML is the single source of truth, for the CLI (``model=conv2``) and for this.

    Raises:
        ConfigError: unknown preset name, or an override the model rejects.
    """
    return build(model_config(name, **overrides), "model", base=nn.Module)


__all__ = ["CONF_DIR", "ConvNet", "DepthwiseNet", "ResNet", "SeparableNet", "ViT", "build_model", "count_parameters",
           "list_presets", "model_config"]
