"""The one Lightning internal mnist_lab uses, in one place: Lightning has no public route to it.

Steps per execution (:mod:`mnist_lab.steps`) runs K mini-batches in one Lightning training step and
keeps every count Lightning makes in mini-batches. Public names cover all but one: optimizer steps
(``global_step``) through ``LightningOptimizer.step`` or the manual loop's ``optim_step_progress``, the
epoch's batches through the loop's ``batch_progress``, a checkpoint's ``every_n_train_steps`` through its
``state_key``. The fit loop's count of training steps, ``_batches_that_stepped``, which gives every logged
row its ``step`` and ``log_every_n_steps`` its cadence, has no public setter. A test pins it
(``tests/test_steps_per_execution.py``: it fails with a message naming this module when a release moves
it), and ``pyproject.toml`` bounds ``lightning`` to the minor version tested.
"""

import lightning as L


def count_steps(trainer: L.Trainer, n: int) -> None:
    """Count ``n`` more training steps in the fit loop (the logged ``step``, ``log_every_n_steps``)."""
    trainer.fit_loop.epoch_loop._batches_that_stepped += n


def steps_counted(trainer: L.Trainer) -> int:
    """The fit loop's count of training steps (what :func:`count_steps` adds to)."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped
