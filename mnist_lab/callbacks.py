"""The training callbacks mnist_lab adds to Lightning's (``conf/callbacks/default.yaml`` lists them all).
"""

import math
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, TQDMProgressBar
from lightning.pytorch.trainer.states import TrainerFn

from mnist_lab.errors import ConfigError, TrainingDiverged, check_count, check_rate


class EMA(EMAWeightAveraging):
    """An exponential moving average of the weights (Polyak & Juditsky 1992), BatchNorm statistics
    included: after every optimizer step ``w_ema = decay * w_ema + (1 - decay) * w``. Validation runs on
    the averaged weights, so ``val/loss`` picks among them, and every checkpoint's ``state_dict`` holds
    them (the raw weights go under ``current_model_state``, for ``resume=``): the tested and the exported
    model is the average.

    Lightning's ``EMAWeightAveraging`` with one change: when ``Trainer.test`` / ``predict`` loads a
    checkpoint after ``fit`` in the same process, Lightning's callback would put the raw weights back
    (``current_model_state``) and test those; here a checkpoint loaded outside ``fit`` keeps its
    ``state_dict``, the average, as ``Classifier.load_from_checkpoint`` does.

    Args:
        decay: weight of the old average per step, in [0, 1); 0.999 averages over ~1,000 steps.
        update_starting_at_step: the first optimizer step (0-based) that updates the average (None: 0).

    Raises:
        ConfigError: ``decay`` outside [0, 1).
    """

    def __init__(self, decay: float = 0.999, update_starting_at_step: int | None = None):
        check_rate("callbacks.ema.decay", decay, "the weight of the old average per step", 0.999)
        super().__init__(decay=decay, update_starting_at_step=update_starting_at_step)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)


class Dynamics(L.Callback):
    """Learning dynamics, every ``every_n_steps`` optimizer steps, to every logger (``metrics.csv``,
    TensorBoard) at that ``step``:

    - ``dynamics/train_loss``, ``dynamics/train_acc``: the training loss and top-1 accuracy over the
      mini-batches since the last record (or the epoch's start), from the module's running sums
      (``Classifier.train_sums``);
    - ``dynamics/grad_norm``: the global L2 norm of the gradient of the step (before clipping);
    - per parameterised layer of the network (a module with parameters of its own, e.g.
      ``backbone.0``; weight and bias together): ``grad_norm/<layer>``, ``weight_norm/<layer>`` (before the
      step) and ``update_ratio/<layer>`` = ``||w_after - w_before|| / ||w_before||``, the step's relative
      update, which is the layer's effective learning rate;
    - ``dynamics/lr``: the learning rate of the step (the first parameter group's).

    Every ``every_n_steps``-th step is recorded (``step`` N - 1, 2N - 1, ...: 0-based, as Lightning's rows), with any
    ``steps_per_execution``: the module ends its groups of mini-batches at those steps
    (:func:`mnist_lab.steps.group_ends`), so each recorded step is the last of its group, which goes
    through Lightning's hooks. The norms are torch's ``get_total_norm`` on the device (Lightning's
    ``grad_norm`` copies every parameter's norm to the host); one host sync per recorded step.
    ``dynamics.png`` in the run dir shows them (:func:`mnist_lab.plots.plot_dynamics`).

    Args:
        every_n_steps: optimizer steps between records; None turns the callback off (the default config).

    Raises:
        ConfigError: ``every_n_steps`` not a positive integer; at ``fit``, a LightningModule without the
            running sums ``train_sums`` of :class:`~mnist_lab.module.Classifier`.
    """

    def __init__(self, every_n_steps: int | None = None):
        if every_n_steps is not None:
            check_count("callbacks.dynamics.every_n_steps", every_n_steps, 1, "50", " optimizer steps; null: off")
        self.every_n_steps = every_n_steps
        self._before: dict | None = None
        self._sums_at_last_record: torch.Tensor | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.every_n_steps and stage == "fit" and not hasattr(pl_module, "train_sums"):
            raise ConfigError(f"callbacks.dynamics reads the training loss and accuracy from a "
                              f"mnist_lab.module.Classifier's train_sums, which {type(pl_module).__name__} lacks: "
                              "train through Classifier, or set callbacks.dynamics.every_n_steps=null")

    @staticmethod
    def _layers(pl_module: L.LightningModule) -> dict[str, list[torch.Tensor]]:
        net = getattr(pl_module, "net", pl_module)
        return {name: list(m.parameters(recurse=False)) for name, m in net.named_modules()
                if any(p.requires_grad for p in m.parameters(recurse=False))}

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sums_at_last_record = None  # the module's running sums start again each epoch

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.every_n_steps or (trainer.global_step + 1) % self.every_n_steps:
            return
        layers = self._layers(pl_module)
        grads = {n: [p.grad for p in ps if p.grad is not None] for n, ps in layers.items()}
        self._before = {
            "grad": torch.nn.utils.get_total_norm([g for gs in grads.values() for g in gs]),
            "grads": torch.stack([torch.nn.utils.get_total_norm(gs) for gs in grads.values()]),
            "layers": layers,
            "weights": {n: [p.detach().clone() for p in ps] for n, ps in layers.items()},
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
        }

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if self._before is None or trainer.global_step % self.every_n_steps:
            return
        before, self._before = self._before, None
        layers = before["layers"]  # the same parameter tensors, updated in place by the step
        w_norm = torch.stack([torch.nn.utils.get_total_norm(ws) for ws in before["weights"].values()])
        deltas = torch.stack([torch.nn.utils.get_total_norm([p.detach() - w for p, w in zip(layers[n], ws)])
                              for n, ws in before["weights"].items()])
        sums = pl_module.train_sums
        window = sums - self._sums_at_last_record if self._sums_at_last_record is not None else sums
        self._sums_at_last_record = sums.clone()
        values = torch.cat([window[:2] / window[2], before["grad"].reshape(1), before["grads"], w_norm,
                            deltas / w_norm]).tolist()  # the one host sync
        n = len(layers)
        metrics = {"dynamics/train_loss": values[0], "dynamics/train_acc": values[1], "dynamics/grad_norm": values[2],
                   "dynamics/lr": before["lr"], **{f"{kind}/{k}": v for i, kind in enumerate(
                       ("grad_norm", "weight_norm", "update_ratio")) for k, v in zip(layers, values[3 + i * n:])}}
        for logger in trainer.loggers if trainer.is_global_zero else ():
            logger.log_metrics(metrics, step=trainer.global_step - 1)  # as Lightning: the 0-based index of the step


class DivergenceGuard(L.Callback):
    """Stop training with :class:`~mnist_lab.errors.TrainingDiverged` when the training loss is NaN,
    inf, or above ``max_loss``: with Adam at ``optimizer.lr=1e6`` the mean cross-entropy jumps to
    1e15-1e30 within two steps and stays finite, while a healthy run starts at ln(10) = 2.3.

    The check runs every ``check_every_n_steps`` optimizer steps (with ``steps_per_execution > 1``: after
    the training step that reaches them, seeing each mini-batch's loss) and always before validation and
    at the end of an epoch, so no checkpoint of diverged weights is written. Each check reads one flag
    from the device (a host sync): on a GPU a larger interval keeps the step loop asynchronous.

    Args:
        check_every_n_steps: steps between checks (1: every step, so the message names the step).
        max_loss: a batch's mean training loss above this is divergence (``null``: NaN/inf only).

    Raises:
        TrainingDiverged: from the step loop, with the epoch, step, loss, learning rate and the fix.
    """

    def __init__(self, check_every_n_steps: int = 1, max_loss: float | None = 1e4):
        check_count("callbacks.divergence.check_every_n_steps", check_every_n_steps, 1, "100")
        self.every, self.max_loss = check_every_n_steps, max_loss
        self._bad: torch.Tensor | None = None  # any bad loss since the last check (a flag on the device)
        self._loss: torch.Tensor | None = None  # the last training step's losses, (K,) with steps_per_execution
        self._checked_at = 0  # global step of the last check

    def _flags(self, losses: torch.Tensor) -> torch.Tensor:
        return ~torch.isfinite(losses) | (losses > (math.inf if self.max_loss is None else self.max_loss))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if (loss := outputs["loss"] if isinstance(outputs, dict) else outputs) is None:
            return
        self._loss = loss.detach().flatten()
        bad = self._flags(self._loss).any()  # on the device, read at the next check
        self._bad = bad if self._bad is None else self._bad | bad
        if trainer.global_step - self._checked_at >= self.every:
            self._check(trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._check(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._check(trainer)

    def _check(self, trainer: L.Trainer) -> None:
        bad, self._bad, self._checked_at = self._bad, None, trainer.global_step
        if bad is not None and bool(bad):
            self._raise(trainer)

    def _raise(self, trainer: L.Trainer) -> None:
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        losses, flags = self._loss, self._flags(self._loss)
        if self.every == 1:  # the first bad mini-batch of the last training step (a group, with K > 1)
            i = int(flags.nonzero()[0, 0]) if flags.any() else len(losses) - 1
            step, loss, where = trainer.global_step - len(losses) + 1 + i, float(losses[i]), "at global step"
        else:
            step, where = trainer.global_step, f"within the {self.every} steps before global step"
            loss = next((v for v in losses.tolist() if not math.isfinite(v)), float(losses.max()))
        limit = f"NaN/inf or above {self.max_loss:g}" if self.max_loss is not None else "NaN/inf"
        saved = next((Path(cb.best_model_path).name for cb in reversed(trainer.checkpoint_callbacks)
                      if getattr(cb, "best_model_path", "")), None)
        kept = (f"checkpoints/{saved} keeps the last good epoch" if saved
                else "no epoch had completed, so no checkpoint was written")
        raise TrainingDiverged(
            f"training diverged: the training loss became {loss:.4g} ({limit}) in epoch "
            f"{trainer.current_epoch}, {where} {step}, at learning rate {lr:g}. Training stopped; {kept}. "
            "Lower optimizer.lr (e.g. by 10x), or clip gradients with trainer.gradient_clip_val=1.0.",
            epoch=trainer.current_epoch, step=step, lr=lr)


class ProgressBar(TQDMProgressBar):
    """Lightning's TQDM progress bar, counting mini-batches whatever ``steps_per_execution`` (a training
    step's hooks get the index of its group's first mini-batch): after a step the bar shows the group's
    last, redrawn once ``refresh_rate`` more mini-batches are done."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        n, bar = trainer.fit_loop.epoch_loop.batch_idx + 1, self.train_progress_bar
        if bar is not None and self.is_enabled and (n // self.refresh_rate > bar.n // self.refresh_rate
                                                    or n == bar.total):
            bar.n = n
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # redraws
