"""Steps per execution (Keras's name): ``K`` optimizer steps per Lightning training step.

With ``K > 1`` the datamodule yields groups of ``K`` batches (it reads the module's
``steps_per_execution``) and :meth:`StepsPerExecution.train_group` runs them with manual optimisation,
exactly as ``K`` steps of automatic optimisation would: zero_grad, backward (through the precision
plugin: bf16 autocast, the fp16 scaler), gradient clipping, optimizer step, a per-step LR scheduler;
per-epoch schedulers after the epoch's last batch (ReduceLROnPlateau after validation).
``global_step`` counts mini-batch steps. Lightning's per-step work (hooks, loop bookkeeping) is paid
once per ``K`` mini-batches (docs/speed.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mnist_lab.errors import ConfigError


class StepsPerExecution:
    """LightningModule mixin for a ``steps_per_execution`` hyper-parameter (``K``).

    Raises:
        ConfigError: from :meth:`check_steps_per_execution`: ``K`` not a positive integer. (Gradient
            accumulation with ``K > 1``, i.e. manual optimisation, Lightning refuses itself.)
    """

    #: (value, "norm" | "value"): the clipping of each of the K steps. Lightning clips only in automatic
    #: optimisation, so mnist_lab.train moves ``trainer.gradient_clip_val`` here.
    gradient_clip: tuple[float, str] | None = None

    @property
    def steps_per_execution(self) -> int:
        """Mini-batches per Lightning training step (the datamodule groups its batches by it)."""
        return self.hparams.steps_per_execution

    def check_steps_per_execution(self) -> None:
        k = self.hparams.steps_per_execution
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ConfigError(f"steps_per_execution={k!r} must be a positive integer, e.g. 8")

    def train_group(self, batch: list, loss_of: Callable[[tuple], torch.Tensor]) -> torch.Tensor:
        """One optimizer step per mini-batch of ``batch`` (a list of ``(images, labels)``); returns the
        losses ``(K,)``. ``loss_of`` maps a mini-batch to its mean loss."""
        opt = self.optimizers()
        # Lightning's backward and step dispatch their hooks (on_before_backward, on_after_backward,
        # on_before_optimizer_step) to every callback: the last mini-batch of the group goes through them,
        # so callbacks see one call per training step as with K = 1; the others call autograd and the
        # optimizer directly, counted as optimizer steps (global_step) all the same. With an fp16 grad
        # scaler every mini-batch takes Lightning's path, which scales the loss and unscales the step.
        direct = getattr(self.trainer.precision_plugin, "scaler", None) is None
        losses = []
        for i, minibatch in enumerate(batch):
            loss = loss_of(minibatch)
            opt.zero_grad()
            lightning_path = not direct or i == len(batch) - 1
            if lightning_path:
                self.manual_backward(loss)
            else:  # the strategy's preparation (DDP: one gradient all-reduce per backward), no hooks
                self.trainer.strategy.pre_backward(loss)
                loss.backward()
            if self.gradient_clip is not None:
                self.clip_gradients(opt, gradient_clip_val=self.gradient_clip[0],
                                    gradient_clip_algorithm=self.gradient_clip[1])
            if lightning_path:
                opt.step()
            else:  # LightningOptimizer.step without the hooks: the loop's step counting, then the step
                opt._on_before_step()
                opt.optimizer.step()
                opt._on_after_step()
            self.step_schedulers("step")
            losses.append(loss.detach())
        return torch.stack(losses)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if not self.automatic_optimization and batch_idx + 1 == self.trainer.num_training_batches:
            self.step_schedulers("epoch")  # where Lightning steps them

    def step_schedulers(self, interval: str, plateau: bool = False) -> None:
        """Step the LR schedulers of ``interval`` (``"step"``, ``"epoch"``) in manual optimisation;
        ``plateau``: ReduceLROnPlateau, on its monitored metric, after validation."""
        for config in self.trainer.lr_scheduler_configs:
            is_plateau = isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
            if config.interval != interval or is_plateau != plateau:
                continue
            if is_plateau:
                config.scheduler.step(self.trainer.callback_metrics[self.scheduler_config.get("monitor", "val/loss")])
            else:
                config.scheduler.step()

    def optimizer_steps(self) -> int:
        """Optimizer steps of the whole run: Lightning's estimate, in mini-batches when a training step
        runs ``steps_per_execution`` of them."""
        trainer, k = self.trainer, self.hparams.steps_per_execution
        steps = int(trainer.estimated_stepping_batches)  # also sets up the train batches
        if k == 1:
            return steps
        per_epoch = min(trainer.num_training_batches * k, trainer.datamodule.train_dataloader().minibatches)
        total = per_epoch * max(trainer.max_epochs, 1)
        return min(total, trainer.max_steps) if trainer.max_steps > 0 else total
