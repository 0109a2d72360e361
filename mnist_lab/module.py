"""Classifier: the one LightningModule, wrapping any network that maps images to logits.

Train, validation and test share ``model_step`` (cross-entropy on logits). Metrics are torchmetrics
objects, accumulated on the device and logged once per epoch (a per-step ``self.log``, sync or
``.item()`` costs more than an ``fc`` step on a 2-core CPU): ``train/loss``, ``train/acc``,
``val/loss``, ``val/acc``, ``val/{precision,recall,f1}_macro`` (``test/`` for ``trainer.test``);
``log_train_steps=True`` adds the per-step ``train/loss_step``. Losses are means over images.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassPrecision, MulticlassRecall

from mnist_lab.config import build
from mnist_lab.errors import ConfigError

SCHEDULERS = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


def eval_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """Top-1 accuracy and macro precision / recall / F1, named ``<prefix>acc`` etc."""
    return MetricCollection({
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "precision_macro": MulticlassPrecision(num_classes, average="macro"),
        "recall_macro": MulticlassRecall(num_classes, average="macro"),
        "f1_macro": MulticlassF1Score(num_classes, average="macro"),
    }, prefix=prefix)


def _plain(value):
    """A DictConfig as plain dicts and lists: what a checkpoint can hold and load with ``weights_only=True``."""
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


def _is_data(value) -> bool:
    """Plain data (dicts, lists, strings, numbers, None): a config, not an object."""
    if isinstance(value, Mapping):
        return all(_is_data(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(_is_data(v) for v in value)
    return value is None or isinstance(value, str | int | float | bool)


class Classifier(L.LightningModule):
    """Image classifier: ``net`` gives logits, trained with cross-entropy.

    Input of ``forward``: float ``(B, 1, 28, 28)`` images in [0, 1]; output: float logits
    ``(B, num_classes)``. The images are normalised inside, ``(x - mean) / std``, with the buffers
    ``mean`` and ``std`` (float32 scalars), which ``setup`` takes from the datamodule it is fitted on
    (its ``mean`` and ``std`` attributes) and every checkpoint keeps. With configs for ``net``,
    ``optimizer`` and ``scheduler`` (saved as hyper-parameters), a checkpoint describes the whole
    model: ``Classifier.load_from_checkpoint(path).eval()`` maps images to logits, no datamodule and
    no config file needed.

    Args:
        net: the network: a ``_target_`` config of an ``nn.Module`` class (``conf/model/*.yaml``, or
            :func:`mnist_lab.models.model_config`), built here and saved in the checkpoint, so
            ``load_from_checkpoint`` rebuilds it; or an ``nn.Module`` object (then pass an equal one to
            ``load_from_checkpoint(path, net=...)``). It maps normalised ``(B, 1, 28, 28)`` to logits.
        optimizer: a ``_target_`` config of a ``torch.optim.Optimizer`` class with ``_partial_: true``
            (``conf/optimizer/*.yaml``), or a ``params -> Optimizer`` callable; default Adam, lr 1e-3
            (the published protocol).
        scheduler: Lightning's LR-scheduler dict, ``{"scheduler": <partial config or callable
            optimizer -> scheduler>, "interval": "epoch" | "step", "monitor": "val/loss"}``
            (``conf/scheduler/*.yaml``); a one-cycle schedule without ``total_steps`` is sized to the run.
        num_classes: number of classes (10).
        channels_last: keep conv weights and input batches in NHWC memory format.
        compile: run the network through ``torch.compile`` (its bound ``forward``, so checkpoints keep
            the plain ``net.*`` keys); the first steps pay the compile time.
        compile_mode: ``torch.compile`` mode: ``default``, ``reduce-overhead`` (CUDA graphs), ``max-autotune``.
        log_train_steps: also log the batch loss as ``train/loss_step``; Lightning writes it every
            ``trainer.log_every_n_steps`` steps. Off by default: ``self.log`` on every step costs a
            third of an ``fc`` step on a 2-core CPU.
        steps_per_execution: mini-batches per Lightning training step (Keras's name). With ``K > 1``
            the datamodule yields groups of ``K`` batches and :meth:`training_step` runs them with
            manual optimisation, one optimizer step each, exactly as ``K`` steps of automatic
            optimisation would: zero_grad, backward (through the precision plugin: bf16 autocast, the
            fp16 scaler), gradient clipping (``gradient_clip``), optimizer step, then a per-step LR
            scheduler; per-epoch schedulers after the epoch's last batch (ReduceLROnPlateau after
            validation). ``global_step`` counts mini-batch steps. Lightning's per-step work
            (hooks, loop bookkeeping) is then paid once per ``K`` mini-batches.

    Raises:
        ConfigError: a ``_target_`` that is not an ``nn.Module`` / optimizer / scheduler class (a config
            from a checkpoint builds nothing else), or bad values for the network.
    """

    def __init__(
        self,
        net: Mapping | nn.Module,
        optimizer: Mapping | Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Mapping | None = None,
        num_classes: int = 10,
        channels_last: bool = False,
        compile: bool = False,
        compile_mode: str = "default",
        log_train_steps: bool = False,
        steps_per_execution: int = 1,
    ):
        super().__init__()
        net, optimizer, scheduler = _plain(net), _plain(optimizer), _plain(scheduler)
        # configs are saved, objects are not: a checkpoint must load with weights_only=True
        self.save_hyperparameters(ignore=[name for name, value in (("net", net), ("optimizer", optimizer),
                                                                   ("scheduler", scheduler)) if not _is_data(value)])
        if isinstance(net, Mapping):
            net = build(net, "model", base=nn.Module)
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net
        if isinstance(optimizer, Mapping):
            optimizer = build(optimizer, "optimizer", base=torch.optim.Optimizer)
        if scheduler is not None and isinstance(scheduler.get("scheduler"), Mapping):
            scheduler = {**scheduler, "scheduler": build(scheduler["scheduler"], "scheduler", base=SCHEDULERS)}
        if not isinstance(steps_per_execution, int) or isinstance(steps_per_execution, bool) or steps_per_execution < 1:
            raise ConfigError(f"steps_per_execution={steps_per_execution!r} must be a positive integer, e.g. 8")
        self.automatic_optimization = steps_per_execution == 1
        #: (value, "norm" | "value") for steps_per_execution > 1, which Lightning's own clipping does not
        #: serve; mnist_lab.train moves trainer.gradient_clip_val here
        self.gradient_clip: tuple[float, str] | None = None
        self.optimizer_factory = optimizer or partial(torch.optim.Adam, lr=1e-3)
        self.scheduler_config = scheduler
        self.register_buffer("mean", torch.tensor(0.0))
        self.register_buffer("std", torch.tensor(1.0))
        # a compiled bound method is a plain function: not a submodule, so no extra state_dict keys
        self._compiled_forward = torch.compile(self.net.forward, mode=compile_mode) if compile else None
        # the training loss and top-1 accuracy of an epoch: three running sums on the device (loss x images,
        # correct, images), one small add per step; a torchmetrics update costs ~0.3 ms a step on a CPU
        # (attribute writes, argmax bookkeeping) and the train split needs no more than sums
        self._train_sums: torch.Tensor | None = None
        self.val_metrics = eval_metrics(num_classes, "val/")
        self.test_metrics = eval_metrics(num_classes, "test/")

    @property
    def name(self) -> str:
        """The network's ``name`` (a preset's, e.g. ``"conv2"``), else its class name."""
        return getattr(self.net, "name", type(self.net).__name__)

    def setup(self, stage: str) -> None:
        """Take the normalisation statistics of the datamodule being fitted (a resumed run then
        restores the same values from its checkpoint)."""
        dm = self.trainer.datamodule
        if stage == "fit" and getattr(dm, "mean", None) is not None:
            self.mean.fill_(dm.mean)
            self.std.fill_(dm.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], float ``(B, 1, 28, 28)`` -> logits ``(B, num_classes)``."""
        x = (x - self.mean) / self.std
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self._compiled_forward(x) if self._compiled_forward is not None else self.net(x)

    def model_step(self, batch: tuple[torch.Tensor, torch.Tensor]):
        """One batch -> ``(mean cross-entropy loss, logits (B, C), labels (B,))``."""
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits, y), logits, y

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        """One mini-batch ``(images, labels)`` -> its mean loss; with ``steps_per_execution > 1`` a
        list of them -> their losses ``(K,)``, each mini-batch an optimizer step."""
        if self.automatic_optimization:
            return self._train_loss(batch)
        opt = self.optimizers()
        configs = self.trainer.lr_scheduler_configs
        # Lightning's backward and step dispatch their hooks (on_before_backward, on_after_backward,
        # on_before_optimizer_step) to every callback: the last mini-batch of the group goes through them,
        # so callbacks see one call per training step as with K = 1; the others call autograd and the
        # optimizer directly, counted as optimizer steps (global_step) all the same. With an fp16 grad
        # scaler every mini-batch takes Lightning's path, which scales the loss and unscales the step.
        direct = getattr(self.trainer.precision_plugin, "scaler", None) is None
        losses = []
        for i, minibatch in enumerate(batch):
            loss = self._train_loss(minibatch)
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
            self._step_schedulers(configs, "step")
            losses.append(loss.detach())
        return torch.stack(losses)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if not self.automatic_optimization and batch_idx + 1 == self.trainer.num_training_batches:
            self._step_schedulers(self.trainer.lr_scheduler_configs, "epoch")  # where Lightning steps them

    def _step_schedulers(self, configs, interval: str, plateau: bool = False) -> None:
        for config in configs:
            is_plateau = isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
            if config.interval != interval or is_plateau != plateau:
                continue
            if is_plateau:
                config.scheduler.step(self.trainer.callback_metrics[self.scheduler_config.get("monitor", "val/loss")])
            else:
                config.scheduler.step()

    def _train_loss(self, batch) -> torch.Tensor:
        loss, logits, y = self.model_step(batch)
        with torch.no_grad():  # the epoch's sums: loss x images (a mean over images, not batches), correct, images
            n = y.numel()
            step = torch.stack([loss.detach().float() * n, (logits.argmax(1) == y).sum().float(),
                                torch.full((), float(n), device=y.device)])
            self._train_sums = step if self._train_sums is None else self._train_sums + step
        if self.hparams.log_train_steps:
            self.log("train/loss_step", loss.detach(), on_step=True, on_epoch=False)
        return loss

    def on_train_epoch_end(self) -> None:
        if not self.automatic_optimization:  # after validation, as Lightning does for ReduceLROnPlateau
            self._step_schedulers(self.trainer.lr_scheduler_configs, "epoch", plateau=True)
        if self._train_sums is not None:  # the mean over images; ranks train equal shares: mean over ranks
            loss_sum, correct, images = self._train_sums
            self.log("train/loss", loss_sum / images, prog_bar=True, sync_dist=True)
            self.log("train/acc", correct / images, prog_bar=True, sync_dist=True)
            self._train_sums = None

    def _eval_step(self, batch, metrics: MetricCollection, prefix: str) -> None:
        loss, logits, y = self.model_step(batch)
        metrics.update(logits, y)
        self.log(f"{prefix}/loss", loss, on_epoch=True, prog_bar=prefix == "val", batch_size=y.numel(), sync_dist=True)
        for name, metric in metrics.items():
            self.log(name, metric, on_epoch=True, prog_bar=name == "val/acc")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def predict_step(self, batch, batch_idx: int = 0) -> torch.Tensor:
        """Logits ``(B, num_classes)`` for a batch of images, or of ``(images, labels)``."""
        return self(batch[0] if isinstance(batch, tuple | list) else batch)

    def configure_optimizers(self):
        try:
            opt = self.optimizer_factory(self.parameters())
        except ValueError as e:  # torch checks lr, momentum, betas, ... here
            raise ConfigError(f"optimizer: {e} (fix the optimizer.* values, e.g. optimizer.lr=0.001)") from None
        if self.scheduler_config is None:
            return opt
        factory = self.scheduler_config["scheduler"]
        one_cycle = getattr(factory, "func", None) is torch.optim.lr_scheduler.OneCycleLR
        if one_cycle and "total_steps" not in factory.keywords:  # sized by the run: epochs x batches
            factory = partial(factory, total_steps=self._optimizer_steps())
        config = {**self.scheduler_config, "scheduler": factory(opt)}
        if not self.automatic_optimization:  # Lightning ignores (and warns about) it; _step_schedulers reads it
            config.pop("monitor", None)
        return {"optimizer": opt, "lr_scheduler": config}

    def _optimizer_steps(self) -> int:
        """Optimizer steps of the whole run: Lightning's estimate, in mini-batches when a training step
        runs ``steps_per_execution`` of them."""
        trainer, k = self.trainer, self.hparams.steps_per_execution
        steps = int(trainer.estimated_stepping_batches)  # also sets up the train batches
        if k == 1:
            return steps
        per_epoch = min(trainer.num_training_batches * k, trainer.datamodule.train_dataloader().minibatches)
        total = per_epoch * max(trainer.max_epochs, 1)
        return min(total, trainer.max_steps) if trainer.max_steps > 0 else total
