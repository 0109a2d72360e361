"""Config helpers: compose the project's Hydra config without the CLI, and instantiate with our errors.

``load_config`` is what tests and notebooks use instead of ``@hydra.main``; the configs it reads
hold no ``${hydra:...}`` interpolations, so they resolve outside a Hydra run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mnist_lab.errors import MnistLabError

# `${mnist_lab.if_resume:${resume},A,B}`: A when resume= is set, else B (conf/train.yaml's hydra run dir)
OmegaConf.register_new_resolver("mnist_lab.if_resume", lambda resume, then, otherwise: then if resume else otherwise,
                                replace=True)

#: The project's config folder (``conf/`` at the repository root; install with ``pip install -e .``).
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def load_config(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with command-line style overrides.

    Example: ``load_config(["model=conv3", "+aug=true", "trainer.max_epochs=1"])``.
    Raises Hydra's own errors for unknown groups/keys (they list the valid options).
    """
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def instantiate_checked(cfg, **kwargs):
    """``hydra.utils.instantiate``, but a :class:`MnistLabError` raised by the target comes out as
    itself (Hydra wraps it in ``InstantiationException``), so its message reaches the user."""
    try:
        return instantiate(cfg, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, MnistLabError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise
