"""What the commands print: Lightning's useful lines (devices, model summary, progress, why fit
stopped) without its noise."""

import logging
import warnings

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
