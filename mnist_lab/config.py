"""Config helpers: compose the project's Hydra config without the CLI (tests, notebooks), name sweep
job dirs, and build ``_target_`` nodes with errors a user can act on."""

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, ListConfig, OmegaConf

from mnist_lab.errors import ConfigError, MnistLabError


def parse_overrides(lines: Sequence[str]) -> list[tuple[str, str, str]]:
    """``(key, value, line)`` per command-line override, read by Hydra's parser: the key without its
    ``+``/``++``/``~``, the value as YAML writes it (``True`` -> ``"true"``), the override as written."""
    parsed = OverridesParser.create().parse_overrides([str(line) for line in lines])
    return [(o.key_or_group, str(v).lower() if isinstance(v := o.value(), bool) else str(v), o.input_line)
            for o in parsed]


def job_dir(num: int | None, overrides: Sequence[str], exclude: Sequence[str] = (), limit: int = 48) -> str:
    """A sweep job's dir name: its number and its overrides with keys cut to their last part and long
    numbers to 4 digits, ``"003_depth=2,seed=0"``, cut beyond ``limit`` characters with a hash of the exact
    overrides added: short and unique whatever the command line. ``num=None`` (an Optuna search, whose
    workers number their jobs each from 0): no number, always the hash, so a trial enqueued again finds
    its own dir. Keys in ``exclude`` (the same for every job) are left out; ``/`` becomes ``_``."""
    parts = [(key.lstrip("+~"), value) for key, _, value in (str(o).partition("=") for o in overrides)]
    parts = [(k, v) for k, v in parts if k not in set(exclude)]
    text = ",".join(f"{k.rsplit('.', 1)[-1]}={_short(v)}" for k, v in parts).replace("/", "_")
    if num is None or len(text) > limit:
        digest = hashlib.sha1(",".join(f"{k}={v}" for k, v in parts).encode()).hexdigest()[:6]
        text = f"{text[:limit - 8]}_{digest}"
    return text if num is None else f"{int(num):03d}_{text}" if text else f"{int(num):03d}"


def _short(value: str) -> str:
    try:
        return f"{float(value):.4g}" if len(value) > 8 and "." in value else value
    except ValueError:
        return value


# `${mnist_lab.job_dir:${hydra.job.num},${hydra.overrides.task},[keys]}`: conf/train.yaml's sweep subdir
OmegaConf.register_new_resolver("mnist_lab.job_dir", job_dir, replace=True)

_PACKAGE = Path(__file__).resolve().parent
#: The project's config folder: ``mnist_lab/conf`` in an installed wheel (``pyproject.toml`` maps the
#: repository's ``conf/`` there), else ``conf/`` beside the package (a clone, or ``pip install -e .``).
CONF_DIR = _PACKAGE / "conf" if (_PACKAGE / "conf").is_dir() else _PACKAGE.parent / "conf"


def load_config(overrides: Sequence[str] = (), config_name: str = "train", hydra: bool = False) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with command-line style overrides (``hydra``: with the ``hydra`` node).

    Example: ``load_config(["model=conv3", "+aug=true", "trainer.max_epochs=1"])``.
    Raises Hydra's own errors for unknown groups/keys (they list the valid options).
    """
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=hydra)


def check_targets(cfg, base: type | tuple[type, ...], key: str) -> None:
    """Check that every ``_target_`` that instantiating ``cfg`` would call names a subclass of ``base``
    (the nested ones too, unless a node says ``_recursive_: false``: its target builds those itself).
    A config can come from a checkpoint (a file from anyone): building only ``nn.Module`` / optimizer /
    scheduler classes keeps it from calling other code.

    Raises:
        ConfigError: a target that cannot be imported, or that is not a ``base`` class.
    """
    if isinstance(cfg, Mapping | DictConfig):
        if "_target_" in cfg:
            try:
                target = get_object(cfg["_target_"])
            except Exception as e:
                raise ConfigError(f"{key}._target_={cfg['_target_']} cannot be imported ({e}); put its module on "
                                  "PYTHONPATH, or fix the name") from None
            if not (isinstance(target, type) and issubclass(target, base)):
                names = " or ".join(f"{b.__module__}.{b.__qualname__}" for b in (base if isinstance(base, tuple)
                                                                                else (base,)))
                raise ConfigError(f"{key}._target_={cfg['_target_']} is not a {names} class, so mnist_lab does not "
                                  "build it")
            if cfg.get("_recursive_") is False:
                return
        for name, value in cfg.items():
            check_targets(value, base, f"{key}.{name}")
    elif isinstance(cfg, Sequence | ListConfig) and not isinstance(cfg, str):
        for i, value in enumerate(cfg):
            check_targets(value, base, f"{key}[{i}]")


def build(cfg, key: str, base: type | tuple[type, ...], **kwargs):
    """``hydra.utils.instantiate(cfg, **kwargs)`` (lists and dicts reach the target as plain Python
    objects), with the user's mistakes as :class:`ConfigError`.

    Args:
        cfg: a ``_target_`` node.
        key: its place in the config (``"model"``), for messages.
        base: every ``_target_`` in ``cfg`` must name a subclass of it (:func:`check_targets`).

    Raises:
        MnistLabError: raised by the target itself (e.g. a ConvNet's ``ConfigError``), unwrapped.
        ConfigError: a bad value or argument for the target (its ``ValueError`` / ``TypeError``, or
            Lightning's ``MisconfigurationException``), with the target's own message.
    """
    check_targets(cfg, base, key)
    try:
        return instantiate(cfg, **{"_convert_": "all", **kwargs})
    except InstantiationException as e:
        chain, cause = [], e.__cause__
        while cause is not None:  # Hydra wraps the target's error, once per level of nesting
            chain.append(cause)
            cause = cause.__cause__
        ours = next((c for c in chain if isinstance(c, MnistLabError)), None)
        if ours is not None:
            raise ours from None
        if chain and isinstance(chain[-1], ValueError | TypeError | MisconfigurationException):
            raise ConfigError(f"{key}: {chain[-1]} (fix the {key}.* values)") from None
        raise


def build_all(nodes, key: str, base: type) -> dict:
    """``{name: object}`` of a group's ``_target_`` nodes (``callbacks``, ``logger``), built with :func:`build`
    in order; ``null`` entries (``callbacks.early_stopping=null``) are skipped."""
    return {name: build(node, f"{key}.{name}", base=base) for name, node in (nodes or {}).items() if node is not None}

