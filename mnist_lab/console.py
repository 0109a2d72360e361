"""What the commands print: Lightning's useful lines (devices, model summary, progress, why fit
stopped) without its noise, and bad input as one ``error:`` line."""

import functools
import logging
import warnings

import hydra

from mnist_lab.config import CONF_DIR
from mnist_lab.errors import MnistLabError, exit_with

#: Lightning's info lines that say nothing about the run: the TPU count and its advertisements.
NOISE = ("TPU available", "💡 Tip")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(NOISE)


def quiet_lightning() -> None:
    """Drop :data:`NOISE` from Lightning's log and three warnings that say nothing about the run:
    torch's pytree ``FutureWarning`` that Lightning's own code triggers, fewer training batches than
    ``log_every_n_steps`` (runs log per epoch), and the CSV logger's note on a run dir that already
    holds files (it holds the run's config; a resumed run's rows are written back). Idempotent."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in log.filters):
            log.addFilter(_DropNoise())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")


def command(config_name: str):
    """``hydra.main`` of a command on ``conf/<config_name>.yaml``, run with :func:`quiet_lightning`; a
    :class:`~mnist_lab.errors.MnistLabError` ends it with one ``error:`` line and its exit code."""
    def decorate(main):
        @functools.wraps(main)
        def run(cfg):
            quiet_lightning()
            try:
                return main(cfg)
            except MnistLabError as e:
                exit_with(e)
        return hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)(run)
    return decorate
