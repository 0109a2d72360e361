"""Classifier: the one LightningModule, wrapping any network that maps images to logits.
"""

import contextlib
import os
import pickle
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_flop_count
from torchmetrics import MetricCollection

from mnist_lab.config import build, check_targets
from mnist_lab.errors import ConfigError, check_rate
from mnist_lab.metrics import eval_metrics
from mnist_lab.rundir import read_checkpoint
from mnist_lab.steps import StepsPerExecution

SCHEDULERS = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
_CPU_ATTENTION = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
if _CPU_ATTENTION not in flop_registry:  # torch's FLOP counter knows the GPU attention kernels, not the CPU one
    register_flop_formula(_CPU_ATTENTION)(lambda q, k, v, *args, out_shape=None, **kw: sdpa_flop_count(q, k, v))


def cache_gpu_absence() -> None:
    """On a machine without a GPU, let ``torch.cuda.is_available()`` answer from CUDA's runtime, which
    caches the count, instead of NVML, which Lightning asks for (``PYTORCH_NVML_BASED_CUDA_CHECK=1``, so
    that no fork is poisoned) and which loads a library at every call: torch.optim asks on every optimizer
    step. Without a GPU there is no CUDA context to poison a fork. A no-op where a GPU is found."""
    if torch.backends.cuda.is_built() and torch.cuda.device_count() == 0:
        os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "0"


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


def check_checkpoint(path: str | Path) -> None:
    """Refuse, in one line, a file that is not a safe, whole mnist_lab checkpoint, before Lightning builds
    anything from it: its network config may name only an ``nn.Module`` class.

    Raises:
        ConfigError: missing, would run code when loaded, not a (Lightning) checkpoint, no network config
            (not mnist_lab's, or mnist_lab 0.1's, which did not describe its network).
    """
    ckpt = read_checkpoint(path)
    hp = ckpt.get("hyper_parameters") or {}
    if "net_config" in hp:
        raise ConfigError(f"{path} was written by mnist_lab 0.1, whose checkpoints do not describe their network; "
                          "retrain it with this version (the same command)")
    if not isinstance(hp.get("net"), dict):
        raise ConfigError(f"{path} is not an mnist_lab checkpoint (no network config); give a .ckpt file written by "
                          "mnist_lab.train or Trainer.save_checkpoint")
    check_targets(hp["net"], nn.Module, "model")
    if "pytorch-lightning_version" not in ckpt or "state_dict" not in ckpt:
        raise ConfigError(f"{path} is not a Lightning checkpoint (no pytorch-lightning_version or state_dict); give "
                          "a .ckpt file written by mnist_lab.train")


def build_parts(net, optimizer, scheduler) -> tuple:
    """``net``, ``optimizer`` (default Adam, lr 1e-3) and ``scheduler`` as objects: ``_target_`` configs built."""
    net = build(net, "model", base=nn.Module) if isinstance(net, Mapping) else net
    if isinstance(optimizer, Mapping):
        optimizer = build(optimizer, "optimizer", base=torch.optim.Optimizer)
    if scheduler is not None and isinstance(scheduler.get("scheduler"), Mapping):
        scheduler = {**scheduler, "scheduler": build(scheduler["scheduler"], "scheduler", base=SCHEDULERS)}
    return net, optimizer or partial(torch.optim.Adam, lr=1e-3), scheduler


@contextlib.contextmanager
def _weights_fit(path: str | Path):
    """Lightning's error for weights that do not fit the network a checkpoint's config describes, in one line."""
    try:
        yield
    except (RuntimeError, pickle.UnpicklingError) as e:
        if "state_dict" not in str(e):
            raise
        raise ConfigError(f"{path}: weights do not fit the architecture its config describes: "
                          f"{str(e).splitlines()[0]}") from None


class Classifier(StepsPerExecution, L.LightningModule):
    """Image classifier: ``net`` gives logits, trained with cross-entropy. ``forward``: float images in
    [0, 1] ``(B, 1, 28, 28)`` -> float logits ``(B, num_classes)``, normalised inside with the float32 scalar
    buffers ``mean`` and ``std`` that ``setup`` takes from the fitted datamodule and every checkpoint keeps.
    Configs for ``net``, ``optimizer`` and ``scheduler`` are saved as hyper-parameters, so a checkpoint
    describes the whole model: ``Classifier.load_from_checkpoint(path)``. Logged per epoch (means over images):
    ``{train,val}/{loss,acc}``, ``val/{precision,recall,f1}_macro`` (``test/`` in ``Trainer.test``).

    Args:
        net: a ``_target_`` config of an ``nn.Module`` class (``conf/model/*.yaml``, ``model_config``), or an
            ``nn.Module`` (then pass an equal one to ``load_from_checkpoint(path, net=...)``).
        optimizer: a ``_target_`` config with ``_partial_: true``, or a ``params -> Optimizer`` callable.
        scheduler: Lightning's LR-scheduler dict (``scheduler``: a partial config or callable; ``interval``,
            ``monitor``); a one-cycle schedule without ``total_steps`` is sized to the run.
        num_classes: the data's classes. channels_last: NHWC conv weights and batches. compile, compile_mode:
            ``torch.compile`` the network's bound ``forward`` (checkpoints keep ``net.*``).
        log_train_steps: also log ``train/loss_step`` every ``trainer.log_every_n_steps`` (docs/speed.md).
        steps_per_execution: mini-batches per Lightning training step, or ``"auto"`` (:mod:`mnist_lab.steps`).
        label_smoothing: the training target puts ``1 - label_smoothing`` on the label and spreads the rest
            over all classes (Szegedy et al. 2016); ``val/loss`` and ``test/loss`` stay plain cross-entropy.

    Raises:
        ConfigError: a ``_target_`` that is not an ``nn.Module`` / optimizer / scheduler class, bad network
            values, a bad ``steps_per_execution``, ``label_smoothing`` outside [0, 1).
    """

    def __init__(self, net: Mapping | nn.Module, optimizer: Mapping | Callable | None = None,
                 scheduler: Mapping | None = None, num_classes: int = 10, channels_last: bool = False,
                 compile: bool = False, compile_mode: str = "default", log_train_steps: bool = False,
                 steps_per_execution: int | str = "auto", label_smoothing: float = 0.0):
        super().__init__()
        check_rate("module.label_smoothing", label_smoothing, "the share of the target spread over all classes", 0.1)
        net, optimizer, scheduler = _plain(net), _plain(optimizer), _plain(scheduler)
        # configs are saved, objects are not: a checkpoint must load with weights_only=True
        self.save_hyperparameters(ignore=[name for name, value in (("net", net), ("optimizer", optimizer),
                                                                   ("scheduler", scheduler)) if not _is_data(value)])
        net, self.optimizer_factory, self.scheduler_config = build_parts(net, optimizer, scheduler)
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net
        self.check_steps_per_execution()
        self.register_buffer("mean", torch.tensor(0.0))
        self.register_buffer("std", torch.tensor(1.0))
        self._compiled_forward = torch.compile(self.net.forward, mode=compile_mode) if compile else None  # no keys
        self.train_sums: torch.Tensor | None = None  # the epoch's loss x images, correct, images (Dynamics reads it)
        self.val_metrics, self.test_metrics = eval_metrics(num_classes, "val/"), eval_metrics(num_classes, "test/")
        self.example_input_array = torch.zeros(1, 1, 28, 28)  # one MNIST image: the model summary's FLOPs

    name = property(lambda self: getattr(self.net, "name", type(self.net).__name__),
                    doc="The network's ``name`` (a preset's, e.g. ``conv2``), else its class name.")

    def flops_per_image(self) -> int:
        """Floating-point operations of one forward pass on one 28x28 image (torch's ``FlopCounterMode``: a
        multiply-add is 2; convolutions, matrix products and attention), counted with gradients on, so that
        a transformer layer takes the plain path the counter sees."""
        counter, training = FlopCounterMode(display=False), self.training
        with torch.enable_grad(), counter:
            self.eval()(self.example_input_array.to(self.device))
        self.train(training)
        return counter.get_total_flops()

    def setup(self, stage: str) -> None:
        """For fit: refuse ``steps_per_execution`` beside options it cannot run with, :func:`cache_gpu_absence`,
        and take the fitted datamodule's normalisation statistics (a resumed run restores the same)."""
        if stage == "fit":
            self.check_per_step_options()
            cache_gpu_absence()
            if getattr(dm := self.trainer.datamodule, "mean", None) is not None:
                self.mean.fill_(dm.mean)
                self.std.fill_(dm.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], float ``(B, 1, 28, 28)`` -> logits ``(B, num_classes)``."""
        x = (x - self.mean) / self.std
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self._compiled_forward(x) if self._compiled_forward is not None else self.net(x)

    def model_step(self, batch: tuple[torch.Tensor, torch.Tensor], label_smoothing: float = 0.0):
        """One batch -> ``(mean cross-entropy loss, logits (B, C), labels (B,))``."""
        logits = self(batch[0])
        return F.cross_entropy(logits, batch[1], label_smoothing=label_smoothing), logits, batch[1]

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        """One mini-batch ``(images, labels)`` -> its mean loss; with ``steps_per_execution > 1`` a list of
        them -> their losses ``(K,)``, each mini-batch an optimizer step."""
        return self.train_loss(batch) if self.automatic_optimization else self.train_group(batch, self.train_loss)

    def train_loss(self, batch) -> torch.Tensor:
        """A mini-batch's training loss (label smoothing applied), added to the epoch's running sums."""
        loss, logits, y = self.model_step(batch, self.hparams.label_smoothing)
        with torch.no_grad():
            step = torch.stack([loss.detach().float() * y.numel(), (logits.argmax(1) == y).sum().float(),
                                torch.full((), float(y.numel()), device=y.device)])
            self.train_sums = step if self.train_sums is None else self.train_sums + step
        if self.hparams.log_train_steps:
            self.log("train/loss_step", loss.detach(), on_step=True, on_epoch=False)
        return loss

    def on_train_epoch_end(self) -> None:
        if not self.automatic_optimization:  # after validation, as Lightning does for ReduceLROnPlateau
            self.step_schedulers("epoch", plateau=True)
        if self.train_sums is not None:  # the mean over images; ranks train equal shares: mean over ranks
            loss_sum, correct, images = self.train_sums
            self.log_dict({"train/loss": loss_sum / images, "train/acc": correct / images}, prog_bar=True,
                          sync_dist=True)
            self.train_sums = None

    def _eval_step(self, batch, metrics: MetricCollection, prefix: str) -> torch.Tensor:
        loss, logits, y = self.model_step(batch)
        metrics.update(logits, y)
        self.log(f"{prefix}/loss", loss, prog_bar=prefix == "val", batch_size=y.numel(), sync_dist=True,
                 add_dataloader_idx=False)
        for name, metric in metrics.items():
            self.log(name, metric, prog_bar=name == "val/acc", add_dataloader_idx=False)
        return logits

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """The test metrics (synced across DDP ranks) of the first test dataloader; the batch's logits
        ``(B, num_classes)`` for every dataloader (the evaluation suite adds perturbed copies of the test split)."""
        return self._eval_step(batch, self.test_metrics, "test") if dataloader_idx == 0 else self(batch[0])

    def predict_step(self, batch, batch_idx: int = 0) -> torch.Tensor:
        """Logits ``(B, num_classes)`` for a batch of images, or of ``(images, labels)``."""
        return self(batch[0] if isinstance(batch, tuple | list) else batch)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path, map_location=None, hparams_file=None, strict=None,
                             weights_only: bool = True, **kwargs) -> "Classifier":
        """Lightning's ``load_from_checkpoint``, safe by default (``weights_only=True``, :func:`check_checkpoint`
        first). Raises ConfigError: as that, or weights that do not fit the network the config describes."""
        if weights_only and "net" not in kwargs:  # the file is read twice: here memory-mapped, to check it
            check_checkpoint(checkpoint_path)
        with _weights_fit(checkpoint_path):
            return super().load_from_checkpoint(checkpoint_path, map_location=map_location, hparams_file=hparams_file,
                                                strict=strict, weights_only=weights_only, **kwargs)

    def configure_optimizers(self):
        try:
            opt = self.optimizer_factory(self.parameters())
        except ValueError as e:  # torch checks lr, momentum, betas, ... here
            raise ConfigError(f"optimizer: {e} (fix the optimizer.* values, e.g. optimizer.lr=0.001)") from None
        if self.scheduler_config is None:
            return opt
        factory = self.scheduler_config["scheduler"]
        if getattr(factory, "func", None) is torch.optim.lr_scheduler.OneCycleLR and "total_steps" not in \
                factory.keywords:  # sized by the run: epochs x batches
            factory = partial(factory, total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {**self.scheduler_config, "scheduler": factory(opt)}}
