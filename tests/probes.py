"""Lightning callbacks the reliability tests plug into real runs (``+callbacks.<name>._target_=probes.X``;
the subprocess gets ``tests/`` on ``PYTHONPATH``). They observe or disturb a run; they never change its math."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import lightning as L
import torch


def at_minibatch(pl_module, batch, batch_idx: int, target: int, action) -> None:
    """Run ``action()`` just before the forward pass of mini-batch ``target`` of the epoch, if this
    training step holds it: with ``steps_per_execution > 1`` a step is a group of mini-batches
    (``batch_idx`` the first one's index), and the target may lie inside it."""
    size = len(batch) if isinstance(batch, list) else 1
    if not batch_idx <= target < batch_idx + size:
        return
    calls = iter(range(size))

    def hook(module, args):
        if next(calls) == target - batch_idx:
            handle.remove()
            action()
    handle = pl_module.register_forward_pre_hook(hook)


class SignalAt(L.Callback):
    """Send ``signal`` (a name: SIGINT, SIGTERM, SIGKILL) to this process when training reaches
    mini-batch ``batch`` of ``epoch``: a kill in the middle of an epoch (and of a group of mini-batches),
    at a known point. It fires once per run dir (a marker file), so the resumed run, which has this
    callback in its saved config, goes on."""

    def __init__(self, epoch: int, batch: int, signal: str):
        self.epoch, self.batch, self.signal = epoch, batch, signal

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        marker = Path(trainer.default_root_dir) / ".probe_signal_sent"
        if trainer.current_epoch == self.epoch and not marker.exists():
            def fire():
                marker.write_text(self.signal)
                os.kill(os.getpid(), getattr(signal, self.signal))
            at_minibatch(pl_module, batch, batch_idx, self.batch, fire)


class SignalAtJob(SignalAt):
    """:class:`SignalAt`, in the sweep job whose number ``$MNIST_LAB_SIGNAL_JOB`` names (no other): the
    sweeps compared with it have the same overrides, and only the environment says which to kill."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        from hydra.core.hydra_config import HydraConfig

        if os.environ.get("MNIST_LAB_SIGNAL_JOB") == str(HydraConfig.get().job.num):
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)


class PoisonAt(L.Callback):
    """Set every weight to NaN when training reaches mini-batch ``batch`` of ``epoch``: the loss turns NaN there."""

    def __init__(self, epoch: int, batch: int):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.current_epoch == self.epoch:
            at_minibatch(pl_module, batch, batch_idx, self.batch, lambda: self._poison(pl_module))

    @staticmethod
    @torch.no_grad()
    def _poison(pl_module) -> None:
        for p in pl_module.parameters():
            p.fill_(float("nan"))


class SeenSamples(L.Callback):
    """Record which training images this rank saw in each epoch, as indices into the train split.

    Batches arrive as images in [0, 1]; with augmentation off, ``round(x * 255)`` gives back the
    stored uint8 image, which is looked up in the train split. Writes
    ``seen_rank<global rank>.json`` (``{epoch: [indices]}``) into the run dir when training ends.
    """

    def __init__(self):
        self.seen: dict[int, list[int]] = {}
        self._index: dict[bytes, int] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        dm = trainer.datamodule
        if self._index is None:
            images = dm.splits["train"][0].cpu()
            self._index = {img.numpy().tobytes(): i for i, img in enumerate(images)}
        for images, _ in batch if isinstance(batch, list) else [batch]:  # a group with steps_per_execution > 1
            pixels = (images.float().cpu() * 255).round().clamp(0, 255).to(torch.uint8)[:, 0]
            self.seen.setdefault(trainer.current_epoch, []).extend(self._index[p.numpy().tobytes()] for p in pixels)

    def on_train_end(self, trainer, pl_module) -> None:
        path = Path(trainer.default_root_dir) / f"seen_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.seen))


class StepIndices(L.Callback):
    """Record what each training step's hooks see: ``[epoch, batch_idx, global_step]`` after the step,
    written to ``step_indices.json`` in the run dir when training ends."""

    def __init__(self):
        self.seen: list[list[int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.seen.append([trainer.current_epoch, batch_idx, trainer.global_step])

    def on_train_end(self, trainer, pl_module) -> None:
        (Path(trainer.default_root_dir) / "step_indices.json").write_text(json.dumps(self.seen))


class FitClock(L.Callback):
    """Seconds from ``on_train_start`` to ``on_train_end`` (what Lightning's Timer measures), written to
    ``fit_seconds.txt`` in the run dir."""

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = time.monotonic()

    def on_train_end(self, trainer, pl_module) -> None:
        (Path(trainer.default_root_dir) / "fit_seconds.txt").write_text(str(time.monotonic() - self._t0))
