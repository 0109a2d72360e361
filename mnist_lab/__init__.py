"""mnist_lab: CNN architecture ablations on MNIST-like data with Lightning and Hydra.

Notebook use::

    from mnist_lab import MNISTDataModule, Classifier, build_model
    dm = MNISTDataModule(split="official", augment=True)
    model = Classifier(build_model("conv2", dropout=0.25))
    lightning.Trainer(max_epochs=5).fit(model, dm)

or the whole CLI run, with its run dir: ``train(load_config(["model=conv2", "+aug=true"]))``, and the
evaluation suite: ``model, dm = load_checkpoint(path); evaluate_robustness(model, dm)``.
"""

from mnist_lab.config import load_config
from mnist_lab.data import MNISTDataModule
from mnist_lab.errors import ConfigError, DataError, MnistLabError
from mnist_lab.evaluate import (
    calibration,
    error_analysis,
    evaluate_checkpoint,
    evaluate_robustness,
    fit_temperature,
    load_checkpoint,
)
from mnist_lab.models import ConvNet, build_model, count_parameters, list_presets
from mnist_lab.module import Classifier
from mnist_lab.predict import predict_files, to_mnist_form
from mnist_lab.train import train
from mnist_lab.transforms import EvalPreset, RandomAffineBatch, TrainPreset

__all__ = [
    "Classifier", "ConfigError", "ConvNet", "DataError", "EvalPreset", "MNISTDataModule", "MnistLabError",
    "RandomAffineBatch", "TrainPreset", "build_model", "calibration", "count_parameters", "error_analysis",
    "evaluate_checkpoint", "evaluate_robustness", "fit_temperature", "list_presets", "load_checkpoint",
    "load_config", "predict_files", "to_mnist_form", "train",
]
