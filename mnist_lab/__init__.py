"""mnist_lab: CNN architecture ablations on MNIST-like data with Lightning and Hydra.

Notebook use::

    from mnist_lab import MNISTDataModule, Classifier, model_config
    dm = MNISTDataModule(split="official", augment=True)
    model = Classifier(model_config("conv2", dropout=0.25))   # or any nn.Module
    lightning.Trainer(max_epochs=5).fit(model, dm)

A checkpoint describes its model and data: ``Classifier.load_from_checkpoint(path)`` maps images in
[0, 1] to logits, ``MNISTDataModule.load_from_checkpoint(path)`` is the data it was trained on. The
whole CLI run, with its run dir: ``train(load_config(["model=conv2", "+aug=true"]))`` (and
``resume(run_dir)`` for a run that was killed); the evaluation suite (``Trainer.test``):
``evaluate_model(model, dm)``; logits (``Trainer.predict``): ``mnist_lab.evaluate.predict(model, images)``;
a run's history: ``read_history(run.history)``; a sweep's jobs and configurations (pandas):
``aggregate(collect(sweep_dir))`` or ``aggregate(read_summary("summary.csv"))``.
"""

import importlib
import sys

from mnist_lab._version import __version__
from mnist_lab.config import load_config
from mnist_lab.data import MNISTDataModule
from mnist_lab.errors import ConfigError, DataError, MnistLabError
from mnist_lab.metrics import calibration, error_analysis, fit_temperature
from mnist_lab.models import ConvNet, build_model, count_parameters, list_presets, model_config
from mnist_lab.module import Classifier
from mnist_lab.results import aggregate, collect, read_summary
from mnist_lab.rundir import RunDir, read_history
from mnist_lab.suite import EvaluationSuite
from mnist_lab.transforms import RandomAffineBatch, to_unit

# evaluate and predict are also commands (python -m mnist_lab.evaluate / predict): importing them here
# would run them twice under `python -m` (runpy warns), so their functions load on first use.
# `train` shares its name with its module, so it is imported here, except while `python -m` locates
# a command (sys.argv[0] is then "-m"): the command does not use it, and runpy would warn.
if sys.argv[:1] != ["-m"]:
    from mnist_lab.train import resume, train
_LAZY = {
    **dict.fromkeys(["evaluate_checkpoint", "evaluate_model"], "mnist_lab.evaluate"),
    **dict.fromkeys(["predict_files", "to_mnist_form"], "mnist_lab.predict"),
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mnist_lab' has no attribute {name!r}")


__all__ = [
    "__version__", "Classifier", "ConfigError", "ConvNet", "DataError", "EvaluationSuite", "MNISTDataModule",
    "MnistLabError", "RandomAffineBatch", "RunDir", "aggregate", "build_model", "calibration", "collect",
    "count_parameters", "error_analysis", "evaluate_checkpoint", "evaluate_model", "fit_temperature", "list_presets",
    "load_config", "model_config", "predict_files", "read_history", "read_summary", "resume", "to_mnist_form",
    "to_unit", "train",
]
