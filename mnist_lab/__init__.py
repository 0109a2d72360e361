"""mnist_lab: CNN architecture ablations on MNIST-like data with Lightning and Hydra.

Notebook use::

    from mnist_lab import MNISTDataModule, Classifier, build_model
    dm = MNISTDataModule(split="official", augment=True)
    model = Classifier(build_model("conv2", dropout=0.25))
    lightning.Trainer(max_epochs=5).fit(model, dm)

or the whole CLI run, with its run dir: ``train(load_config(["model=conv2", "+aug=true"]))``.
"""

from mnist_lab.config import load_config
from mnist_lab.data import MNISTDataModule
from mnist_lab.errors import ConfigError, DataError, MnistLabError
from mnist_lab.models import ConvNet, build_model, count_parameters, list_presets
from mnist_lab.module import Classifier
from mnist_lab.train import train
from mnist_lab.transforms import EvalPreset, RandomAffineBatch, TrainPreset

__all__ = [
    "Classifier", "ConfigError", "ConvNet", "DataError", "EvalPreset", "MNISTDataModule", "MnistLabError",
    "RandomAffineBatch", "TrainPreset", "build_model", "count_parameters", "list_presets", "load_config", "train",
]
