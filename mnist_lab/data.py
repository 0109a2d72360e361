"""MNISTDataModule: MNIST-format datasets held in memory, split and batched by index.

The IDX files are read once by torchvision's MNIST readers into uint8 tensors (70,000 x 28 x 28 is
55 MB), each split one tensor on the device the model trains on, batched by :mod:`mnist_lab.batches`
as float images in [0, 1]. The datamodule measures the normalisation statistics; the model applies them.
"""

import os
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
import torchvision
from torchvision.datasets.mnist import read_image_file, read_label_file

from mnist_lab.batches import BatchIndexSampler, InMemoryBatches
from mnist_lab.errors import ConfigError, DataError, check_bool, check_choice, check_count
from mnist_lab.rundir import read_checkpoint
from mnist_lab.transforms import RandomAffineBatch

#: ``data.dataset`` names -> torchvision classes: MNIST's IDX format, 28x28 grayscale, 10 classes each.
DATASETS = {"mnist": torchvision.datasets.MNIST, "fashion_mnist": torchvision.datasets.FashionMNIST,
            "kmnist": torchvision.datasets.KMNIST}
FIX = "Replace it with the original file (delete it and run again with internet to re-download)."


def read_split(images_path: Path, labels_path: Path, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One split's images, uint8 ``(n, 28, 28)``, and labels, int64 ``(n,)``, read by torchvision.

    Raises:
        DataError: a file that is not a whole IDX file of its kind (wrong magic number, truncated), image
            and label counts that differ, or a label outside ``0 .. num_classes - 1``.
    """
    read = []
    for kind, path, reader in (("images", images_path, read_image_file), ("labels", labels_path, read_label_file)):
        try:
            read.append(reader(str(path)))
        except Exception as e:  # torchvision asserts, or fails to view the bytes as the header's shape
            reason = f"torchvision: {str(e).splitlines()[0]}" if str(e) else f"torchvision's {type(e).__name__}"
            raise DataError(f"dataset file {path} is not a whole IDX {kind} file: {Path(path).stat().st_size} bytes "
                            f"({reason}). {FIX}") from None
    images, labels = read
    if len(images) != len(labels):
        raise DataError(f"{images_path} has {len(images)} images but {Path(labels_path).name} has {len(labels)} "
                        "labels; the files do not belong together. Replace them.")
    if (bad := labels >= num_classes).any():
        raise DataError(f"{labels_path} has {int(bad.sum())} labels outside 0-{num_classes - 1} "
                        f"(e.g. {int(labels[bad][0])}); the file is corrupt. Replace it.")
    return images, labels


def stratified_split(labels: torch.Tensor, fractions: Sequence[float], seed: int,
                     num_classes: int = 10) -> list[torch.Tensor]:
    """Indices of int64 ``labels`` ``(N,)`` split into parts of the given ``fractions`` (summing to 1),
    stratified by class, as int64 index tensors in random order. Part ``j`` gets exactly
    ``round(fractions[j] * N)`` samples (part 0 takes the rounding rest), each class within one sample
    of ``fractions[j] * class_count``. Depends only on ``labels``, ``fractions`` and ``seed`` (its own
    generator, not the global RNG)."""
    n, k, g = labels.numel(), len(fractions), torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    by_class = perm[torch.argsort(labels[perm], stable=True)]  # grouped by class, random within
    counts = torch.bincount(labels, minlength=num_classes).double()
    quota = torch.zeros(counts.numel(), k, dtype=torch.long)
    for j in range(1, k):  # parts 1.. get exact totals by largest remainder; part 0 takes the rest
        want = counts * fractions[j]
        q = want.floor().long()
        short = round(fractions[j] * n) - int(q.sum())
        if short > 0:
            q[torch.argsort(want - q, descending=True, stable=True)[:short]] += 1
        quota[:, j] = q
    quota[:, 0] = counts.long() - quota[:, 1:].sum(1)
    if (quota[:, 0] < 0).any():
        raise ConfigError(f"fractions {list(fractions)} leave no room for some class; use larger first fraction")
    pieces = [torch.split(segment, quota[c].tolist())
              for c, segment in enumerate(torch.split(by_class, counts.long().tolist()))]
    # shuffle each part once so the stored order is not grouped by class
    return [p[torch.randperm(p.numel(), generator=g)] for p in (torch.cat(ps) for ps in zip(*pieces))]


def check_args(dataset: str, split: str, fractions: Sequence[float], val_fraction: float, normalize: str,
               augment: bool, batch_size: int, eval_batch_size: int) -> list[float]:
    """The datamodule's arguments checked before any data is read; returns ``fractions`` as floats.

    Raises:
        ConfigError: an unknown name, fractions that are not three non-negative numbers summing to 1 with a
            positive train share, ``val_fraction`` outside (0, 1), a batch size that is not a positive
            integer, ``augment`` not a boolean.
    """
    for key, value, choices in (("dataset", dataset, DATASETS), ("split", split, ("pooled", "official")),
                                ("normalize", normalize, ("standardize", "rescale"))):
        check_choice(f"data.{key}", value, choices)
    fractions = [float(f) for f in fractions]
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6 or not fractions[0]:
        raise ConfigError(f"data.fractions={fractions} must be three non-negative train/val/test fractions that "
                          f"sum to 1 (sum is {sum(fractions):.6g}), train's positive, e.g. [0.8,0.1,0.1]")
    if not 0 < val_fraction < 1:
        raise ConfigError(f"data.val_fraction={val_fraction} must be in (0, 1), e.g. 0.1")
    for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
        check_count(f"data.{name}", value, 1, f"data.{name}=64")
    check_bool("aug/data.augment", augment, " (on the command line: +aug=true or +aug=false)")
    return fractions


def make_splits(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor], hp) -> dict:
    """``{"train": (x, y), "val": ..., "test": ...}`` and their indices (into the pooled images, or into
    the official train and test files) from the official train and test tensors, as ``hp`` (the
    datamodule's hyper-parameters) says: ``pooled`` splits both by ``fractions``, ``official`` keeps the
    official test set and splits ``val_fraction`` off the train set, stratified, by ``split_seed``."""
    (x_tr, y_tr), (x_te, y_te), c = train, test, hp.num_classes
    if hp.split == "pooled":
        x, y = torch.cat([x_tr, x_te]), torch.cat([y_tr, y_te])
        idx = stratified_split(y, hp.fractions, hp.split_seed, c)
        parts = [(x[i], y[i]) for i in idx]
    else:
        idx = [*stratified_split(y_tr, [1 - hp.val_fraction, hp.val_fraction], hp.split_seed, c),
               torch.arange(len(y_te))]
        parts = [(x_tr[idx[0]], y_tr[idx[0]]), (x_tr[idx[1]], y_tr[idx[1]]), (x_te, y_te)]
    names = ("train", "val", "test")
    return {k: (x.contiguous(), y.contiguous()) for k, (x, y) in zip(names, parts)}, dict(zip(names, idx))


class MNISTDataModule(L.LightningDataModule):
    """MNIST, Fashion-MNIST or KMNIST in memory, with stratified splits, normalisation and augmentation.

    Args:
        root: holds ``<Dataset>/raw/<IDX files>`` (torchvision's layout); None: ``$MNIST_LAB_DATA``, else ``data``.
        dataset: ``"mnist"``, ``"fashion_mnist"`` or ``"kmnist"``.
        split: ``"pooled"``: the 60k train and 10k test images pooled and split by ``fractions``
            (80/10/10: 56,000 / 7,000 / 7,000); ``"official"``: the official 10k test set, validation a
            stratified ``val_fraction`` of the 60k train set (54,000 / 6,000 / 10,000).
        fractions, val_fraction, split_seed: the splits (:func:`make_splits`), apart from the training seed.
        normalize: what ``setup`` sets ``mean`` and ``std`` to: ``"standardize"``: the train split's pixel
            mean and std in [0, 1]; ``"rescale"``: 0 and 1.
        augment: per-image random affine on training batches only; ``augmentation``: its arguments
            (:class:`mnist_lab.transforms.RandomAffineBatch`: degrees, translate, zoom).
        batch_size, eval_batch_size: training and validation/test batch sizes (images).
        download: download through torchvision (in ``prepare_data``) when the files are missing.
        drop_last: drop the last, incomplete training batch.
        on_device: keep the splits on the trainer's device; ``False``: on the CPU, Lightning moves batches.
        num_classes: the dataset's classes (10): the config's one place for it (``${data.num_classes}``).
        steps_per_execution: ignored (0.2 checkpoints carry it): the module groups the training batches.

    Raises:
        ConfigError: any argument out of range (:func:`check_args`, before any data is read).
        DataError: from ``prepare_data``/``setup``: files missing (and not downloadable) or corrupt.
    """

    def __init__(self, root: str | os.PathLike | None = None, dataset: str = "mnist", split: str = "pooled",
                 fractions: Sequence[float] = (0.8, 0.1, 0.1), val_fraction: float = 0.1, split_seed: int = 0,
                 normalize: str = "standardize", augment: bool = False, augmentation: dict | None = None,
                 batch_size: int = 32, eval_batch_size: int = 256, download: bool = True, drop_last: bool = False,
                 on_device: bool = True, num_classes: int = 10, steps_per_execution: int | None = None):
        super().__init__()
        fractions = check_args(dataset, split, fractions, val_fraction, normalize, augment, batch_size,
                               eval_batch_size)
        root = str(root) if root is not None else None  # plain types only in checkpoints (weights_only loading)
        self.save_hyperparameters(ignore=["steps_per_execution"])
        self.root = Path(root if root is not None else os.environ.get("MNIST_LAB_DATA") or "data")
        self.dataset_cls = DATASETS[dataset]
        self.augmenter = RandomAffineBatch(**dict(augmentation or {})) if augment else None
        self.mean, self.std = None, None  # float, set by setup()
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.split_indices: dict[str, torch.Tensor] = {}

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, weights_only: bool = True,
                             **kwargs) -> "MNISTDataModule":
        """Lightning's, safe by default (``weights_only=True``): the data a checkpoint was trained on;
        ``kwargs`` override saved arguments (``root=...``).

        Raises:
            ConfigError: the file is not a safe PyTorch checkpoint, or it does not describe its data.
        """
        if cls.CHECKPOINT_HYPER_PARAMS_KEY not in read_checkpoint(checkpoint_path):
            raise ConfigError(f"{checkpoint_path} does not describe its data (no datamodule hyper-parameters): give "
                              "a checkpoint written by mnist_lab.train, or fit with an MNISTDataModule")
        return super().load_from_checkpoint(checkpoint_path, map_location, hparams_file, weights_only, **kwargs)

    def _files(self) -> list[Path]:
        """The IDX files (train images, labels; t10k images, labels) in ``root/<DatasetClass>/raw``."""
        raw = self.root / self.dataset_cls.__name__ / "raw"
        return [raw / Path(url).name.removesuffix(".gz") for url, _ in self.dataset_cls.resources]

    def _not_found(self, reason: str) -> DataError:
        missing, name = [f for f in self._files() if not f.is_file()], self.dataset_cls.__name__
        return DataError(f"{name} not found: looked in {missing[0].parent.resolve()} for "
                         f"{', '.join(f.name for f in missing)}, and {reason}. Point mnist_lab at a folder that holds "
                         f"{name}/raw/<those files>: set MNIST_LAB_DATA=/path/to/root or pass data.root=/path/to/root "
                         "(torchvision's layout).")

    def prepare_data(self) -> None:
        """Download the files through torchvision if they are missing and ``download`` is on.

        Raises:
            DataError: files missing and download off or failed; where it looked and how to point at them.
        """
        if all(f.is_file() for f in self._files()):
            return
        reason = "download is off (data.download=false)"
        if self.hparams.download:
            try:
                self.dataset_cls(str(self.root), train=True, download=True)
                return
            except Exception as e:  # torchvision raises RuntimeError/URLError per mirror
                reason = f"the download failed: {str(e).strip().splitlines()[0]}"
        raise self._not_found(reason)

    def setup(self, stage: str | None = None) -> None:
        """Read the files (once), build the splits and the normalisation statistics, and place the
        splits on the trainer's device. Safe to call again (e.g. by Lightning after a manual call)."""
        if not self.splits:
            files = self._files()
            if not all(f.is_file() for f in files):
                raise self._not_found("setup() only reads them. Call prepare_data() first (it downloads them)")
            c = self.hparams.num_classes
            self.splits, self.split_indices = make_splits(read_split(*files[:2], c), read_split(*files[2:], c),
                                                          self.hparams)
            x, rescale = self.splits["train"][0].to(torch.float64).div_(255.0), self.hparams.normalize == "rescale"
            self.mean, self.std = (0.0, 1.0) if rescale else (float(x.mean()), float(x.std()))
        if self.hparams.on_device and self.trainer is not None:
            device = self.trainer.strategy.root_device
            self.splits = {k: (x.to(device), y.to(device)) for k, (x, y) in self.splits.items()}

    @property
    def split_sizes(self) -> dict[str, int]:
        """Number of images per split, e.g. ``{"train": 56000, "val": 7000, "test": 7000}``."""
        return {k: int(v[1].numel()) for k, v in self.splits.items()}

    def _sampler(self, n: int, batch_size: int, device: torch.device, **kwargs) -> BatchIndexSampler:
        """Index batches of this rank's share (every rank: the same order, under DDP)."""
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        return BatchIndexSampler(n, batch_size, rank=rank, world_size=world, device=device, **kwargs)

    def eval_batches(self, images: torch.Tensor, labels: torch.Tensor) -> InMemoryBatches:
        """Evaluation batches of ``eval_batch_size``, in order (under DDP, this rank's share), of uint8
        ``(N, 28, 28)`` or [0, 1] float ``(N, 1, 28, 28)`` images and int64 ``(N,)`` labels: a split, its
        first N images, a perturbed copy."""
        return InMemoryBatches(images, labels, self._sampler(len(labels), self.hparams.eval_batch_size, images.device,
                                                             shuffle=False))

    def train_dataloader(self) -> InMemoryBatches:
        x, y = self._split("train")
        # the shuffling seed follows the training seed (lightning.seed_everything / torch.manual_seed)
        sampler = self._sampler(len(y), self.hparams.batch_size, x.device, shuffle=True,
                                drop_last=self.hparams.drop_last, seed=torch.initial_seed() % 2**31)
        return InMemoryBatches(x, y, sampler, self.augmenter)  # the module groups them (steps_per_execution)

    def val_dataloader(self) -> InMemoryBatches:
        return self.eval_batches(*self._split("val"))

    def test_dataloader(self) -> InMemoryBatches:
        return self.eval_batches(*self._split("test"))

    def _split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.splits:
            raise RuntimeError("call setup() before asking for batches")
        return self.splits[name]

    def describe(self) -> dict:
        """What a run's ``metrics.json`` records of its data: dataset, split (sizes ``n_train``, ``n_val``,
        ``n_test``), augmentation, batch size, the normalisation statistics and the data root."""
        hp = self.hparams
        return {"dataset": hp.dataset, "split": hp.split, "split_seed": hp.split_seed,
                **{f"n_{k}": v for k, v in self.split_sizes.items()}, "aug": hp.augment, "batch_size": hp.batch_size,
                "normalize": {"mode": hp.normalize, "mean": self.mean, "std": self.std},
                "data_root": str(self.root.resolve())}
