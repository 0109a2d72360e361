"""Steps per execution (Keras's name): ``K`` optimizer steps per Lightning training step.

With ``K > 1`` the datamodule's training batches come in groups of up to ``K`` (the module sets the loader's
``group_ends`` each epoch) and :meth:`StepsPerExecution.train_group` runs them with manual optimisation,
each mini-batch exactly as a step of automatic optimisation: zero_grad, backward, gradient clipping
(``trainer.gradient_clip_val``), optimizer step, a per-step LR scheduler; per-epoch schedulers after the
epoch's last batch (ReduceLROnPlateau after validation). Lightning's per-step work (hooks, loop bookkeeping,
logging) is paid once per group.

``K`` is invisible in what Lightning counts: after each group its batch counters move on by the group's
mini-batches, so ``limit_train_batches``, ``log_every_n_steps``, ``val_check_interval``, ``max_steps``,
checkpoints every N steps, ``global_step`` and the ``step`` column of ``metrics.csv`` count mini-batches
for every ``K``, and a callback's ``batch_idx`` is the index of the group's first mini-batch. A group ends
early wherever one of those options acts, so each acts after the same mini-batch as with ``K = 1``.
``"auto"`` (the default) takes :func:`max_steps_per_execution`; options that act on every optimizer step
(gradient accumulation, weight averaging, SWA, a per-step LR monitor) make it 1.
"""

import re
from collections.abc import Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, StochasticWeightAveraging, WeightAveraging

from mnist_lab.callbacks import Dynamics
from mnist_lab.errors import ConfigError, check_count
from mnist_lab.lightning_internals import count_steps

#: images per Lightning step that ``auto`` aims for: Lightning's per-step cost (~0.3 ms of Python, a few
#: hooks per callback) is then small beside the step's compute on a CPU; on a GPU the steps of these
#: networks are all overhead, so ``auto`` takes the largest ``K``.
AUTO_IMAGES = 2048
AUTO_MAX = 32


def max_steps_per_execution(batch_size: int, device: torch.device) -> int:
    """The ``K`` that ``"auto"`` starts from: :data:`AUTO_MAX` on a GPU, else ``AUTO_IMAGES // batch_size``
    within [1, :data:`AUTO_MAX`] (32 at batch 32 or 64, 8 at 256, 1 from 2048)."""
    return AUTO_MAX if device.type != "cpu" else max(1, min(AUTO_MAX, AUTO_IMAGES // batch_size))


def every_n_train_steps(callback: ModelCheckpoint) -> int:
    """A checkpoint callback's ``every_n_train_steps`` (0: off), from its public ``state_key`` (the key of
    its state in every checkpoint file, so Lightning keeps its form)."""
    found = re.search(r"'every_n_train_steps': (\d+)", callback.state_key)
    return int(found.group(1)) if found else 0


def group_ends(trainer: L.Trainer, k: int, log_steps: bool) -> list[int]:
    """Where this epoch's groups of at most ``k`` mini-batches end, as counts of the epoch's batches: after
    every ``k``, and wherever an option counted in training steps acts (``val_check_interval``, counted in
    the epoch, or over the run without ``check_val_every_n_epoch``; ``log_every_n_steps`` when the module
    logs steps; checkpoints every N steps; the :class:`~mnist_lab.callbacks.Dynamics` records; ``max_steps``);
    the last end is the epoch's ``num_training_batches``."""
    loop = trainer.fit_loop.epoch_loop
    # batches of this epoch already trained: 0, or where a checkpoint saved mid-epoch left it (Lightning's
    # loop counts them once it restarts, after this hook; one more if it was saved at a batch's end)
    done = loop.batch_progress.current.completed + loop.restarted_on_train_batch_end if loop.restarting else 0
    n, start = trainer.num_training_batches, trainer.global_step
    run_wide = [trainer.max_steps] if trainer.max_steps > 0 else []
    run_wide += [every_n_train_steps(cb) for cb in trainer.checkpoint_callbacks if every_n_train_steps(cb)]
    run_wide += [trainer.log_every_n_steps] if log_steps else []
    run_wide += [cb.every_n_steps for cb in trainer.callbacks if isinstance(cb, Dynamics) and cb.every_n_steps]
    in_epoch = []
    if trainer.val_check_batch is not None and trainer.val_check_batch < n:
        (in_epoch if trainer.check_val_every_n_epoch is not None else run_wide).append(int(trainer.val_check_batch))
    ends, last = [], done
    for p in range(done + 1, n + 1):
        if p - last == k or p == n or any(p % c == 0 for c in in_epoch) or \
                any((start + p - done) % c == 0 for c in run_wide):
            ends.append(p - done)
            last = p
    return ends


def per_step_option(trainer: L.Trainer) -> str | None:
    """What acts on every optimizer step and so needs ``K = 1``, in words; None: nothing."""
    if trainer.accumulate_grad_batches > 1:
        return f"gradient accumulation (trainer.accumulate_grad_batches={trainer.accumulate_grad_batches})"
    for cb in trainer.callbacks:
        if isinstance(cb, StochasticWeightAveraging | WeightAveraging):
            return f"the {type(cb).__name__} callback (it averages weights through Lightning's automatic optimisation)"
        if isinstance(cb, LearningRateMonitor) and cb.logging_interval == "step":
            return "LearningRateMonitor(logging_interval='step')"
    return None


class StepsPerExecution:
    """LightningModule mixin for a ``steps_per_execution`` hyper-parameter (``K``: an int, or ``"auto"``).

    Raises:
        ConfigError: from :meth:`check_steps_per_execution`: ``K`` neither ``"auto"`` nor a positive integer;
            when training starts: ``K > 1`` with an option that acts on every optimizer step (named in the
            message, with the fix), or with training batches that are not mnist_lab's.
    """

    _k: int | None = None  # resolved when training starts

    @property
    def steps_per_execution(self) -> int:
        """Mini-batches per Lightning training step: the hyper-parameter, ``auto`` resolved once training starts."""
        return self._k or (self.hparams.steps_per_execution if self.hparams.steps_per_execution != "auto" else 1)

    def check_steps_per_execution(self) -> None:
        k = self.hparams.steps_per_execution
        if k != "auto":
            check_count("steps_per_execution", k, 1, "8, or auto")

    def check_per_step_options(self) -> None:
        """Refuse an explicit ``K > 1`` beside an option that acts on every optimizer step (from ``setup``)."""
        k = self.hparams.steps_per_execution
        if k != "auto" and k > 1 and (per_step := per_step_option(self.trainer)):
            raise ConfigError(f"steps_per_execution={k} cannot run with {per_step}; use steps_per_execution=1 "
                              "(or auto)")

    def on_train_start(self) -> None:
        """Resolve ``K``: ``auto`` from the batch size and the device; 1 beside an option that acts on every
        step, or for a training loader that cannot group its batches (not mnist_lab's datamodule's)."""
        trainer, k = self.trainer, self.hparams.steps_per_execution
        loader = trainer.train_dataloader
        if not hasattr(loader, "group_ends"):
            if k != "auto" and k > 1:
                raise ConfigError(f"steps_per_execution={k} needs mnist_lab's training batches (MNISTDataModule), "
                                  f"not a {type(loader).__name__}; use steps_per_execution=1 (or auto)")
            k = 1
        elif k == "auto":
            k = 1 if per_step_option(trainer) else max_steps_per_execution(loader.sampler.batch_size, self.device)
        self._k = k
        self.automatic_optimization = k == 1
        self.on_train_epoch_start()  # which Lightning skips for an epoch restarted from a mid-epoch checkpoint

    def on_train_end(self) -> None:
        self.automatic_optimization = True  # as Lightning checks the settings of the next fit, before it starts

    def on_train_epoch_start(self) -> None:
        """Group the epoch's training batches (the loader is rebuilt when dataloaders reload)."""
        loader = self.trainer.train_dataloader
        if hasattr(loader, "group_ends"):
            log_steps = bool(self.hparams.get("log_train_steps"))
            loader.group_ends = group_ends(self.trainer, self._k, log_steps) if self._k > 1 else None

    def train_group(self, batch: list, loss_of: Callable[[tuple], torch.Tensor]) -> torch.Tensor:
        """One optimizer step per mini-batch of ``batch`` (a list of ``(images, labels)``); returns the
        losses ``(K,)``. ``loss_of`` maps a mini-batch to its mean loss."""
        opt, trainer = self.optimizers(), self.trainer
        # Lightning's backward and step dispatch their hooks (on_before_backward, on_after_backward,
        # on_before_optimizer_step) to every callback: the group's last mini-batch goes through them, so
        # callbacks see one call per training step, as with K = 1. The others call autograd and the optimizer
        # directly, each step counted in the loop's optimizer-step progress (global_step) as Lightning's step
        # counts it: that saves the hooks' cost, a fifth of fc's step at batch 32 (docs/speed.md). With an
        # fp16 grad scaler every mini-batch takes Lightning's path, which scales the loss and unscales the step.
        steps = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        direct = getattr(trainer.precision_plugin, "scaler", None) is None
        losses = []
        for i, minibatch in enumerate(batch):
            loss = loss_of(minibatch)
            opt.zero_grad()
            lightning_path = not direct or i == len(batch) - 1
            if lightning_path:
                self.manual_backward(loss)
            else:  # the strategy's preparation (DDP: one gradient all-reduce per backward), no hooks
                trainer.strategy.pre_backward(loss)
                loss.backward()
            if trainer.gradient_clip_val:  # Lightning clips only in automatic optimisation
                self.clip_gradients(opt, gradient_clip_val=trainer.gradient_clip_val,
                                    gradient_clip_algorithm=trainer.gradient_clip_algorithm)
            if lightning_path:
                opt.step()
            else:
                steps.increment_ready()
                opt.optimizer.step()
                steps.increment_completed()
            self.step_schedulers("step")
            losses.append(loss.detach())
        # Lightning counts this training step as one batch: the rest of the group's mini-batches too, so
        # its counted options (epoch end, validation, logging, the logged step) count mini-batches
        progress = trainer.fit_loop.epoch_loop.batch_progress
        progress.increment_by(len(batch) - 1, is_last_batch=progress.is_last_batch)
        count_steps(trainer, len(batch) - 1)
        return torch.stack(losses)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if not self.automatic_optimization and self.trainer.fit_loop.epoch_loop.batch_idx + 1 == \
                self.trainer.num_training_batches:
            self.step_schedulers("epoch")  # where Lightning steps them

    def step_schedulers(self, interval: str, plateau: bool = False) -> None:
        """Step the LR schedulers of ``interval`` (``"step"``, ``"epoch"``) in manual optimisation;
        ``plateau``: ReduceLROnPlateau, on its monitored metric, after validation."""
        for config in self.trainer.lr_scheduler_configs:
            is_plateau = isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
            if config.interval != interval or is_plateau != plateau:
                continue
            if is_plateau:
                config.scheduler.step(self.trainer.callback_metrics[config.monitor or "val/loss"])
            else:
                config.scheduler.step()
