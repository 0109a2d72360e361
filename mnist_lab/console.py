"""What the commands print: Lightning's useful lines (devices, model summary, progress, why fit
stopped) without its noise."""

from __future__ import annotations

import logging
import warnings

#: Lightning's info lines that say nothing about the run: the TPU count and its advertisements.
NOISE = ("TPU available", "💡 Tip")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(NOISE)


def quiet_lightning() -> None:
    """Drop :data:`NOISE` from Lightning's log, the ``FutureWarning`` that Lightning's own code
    (``lightning/pytorch/utilities/_pytree.py``) triggers in torch's pytree, and the warning about fewer
    training batches than ``log_every_n_steps``. Idempotent."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in log.filters):
            log.addFilter(_DropNoise())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*", category=FutureWarning)
    # runs log per epoch: a run with fewer batches than log_every_n_steps loses nothing
    warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
