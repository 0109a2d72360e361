"""MNISTDataModule: MNIST-format datasets held in memory, split and batched by index.

The IDX files are read once into uint8 tensors (70,000 x 28 x 28 is 55 MB; :mod:`mnist_lab.idx`);
each split is one tensor, placed on the device the model trains on. A batch is an index slice of a
shuffled permutation: no ``Dataset.__getitem__`` per image, no DataLoader workers. Batches are
float images in [0, 1]; augmentation runs on the whole batch (:mod:`mnist_lab.transforms`). The
datamodule measures the normalisation statistics (``mean``, ``std``); the model applies them
(:class:`mnist_lab.module.Classifier` keeps them as buffers, so its checkpoints carry them).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import lightning as L
import torch
import torchvision

from mnist_lab.errors import ConfigError, DataError
from mnist_lab.idx import read_split
from mnist_lab.transforms import RandomAffineBatch, to_unit

#: ``data.dataset`` names -> torchvision classes. All three share MNIST's IDX format,
#: 28x28 grayscale images and 10 classes.
DATASETS = {
    "mnist": torchvision.datasets.MNIST,
    "fashion_mnist": torchvision.datasets.FashionMNIST,
    "kmnist": torchvision.datasets.KMNIST,
}
SPLITS = ("pooled", "official")
NORMALIZATIONS = ("standardize", "rescale")
NUM_CLASSES = 10


def default_data_root() -> Path:
    """The data root used when none is given: ``$MNIST_LAB_DATA`` if set, else ``./data``."""
    return Path(os.environ.get("MNIST_LAB_DATA") or "data")


def stratified_split(labels: torch.Tensor, fractions: Sequence[float], seed: int) -> list[torch.Tensor]:
    """Split sample indices into parts with the given fractions, stratified by class.

    Part sizes are exact: part ``j`` gets ``round(fractions[j] * N)`` samples (the first part takes
    the rounding rest), and every class is spread over the parts in proportion to its size
    (each class's share of a part is within one sample of ``fractions[j] * class_count``).
    The result depends only on ``labels``, ``fractions`` and ``seed``.

    Args:
        labels: int64 ``(N,)`` class labels.
        fractions: part fractions, non-negative, summing to 1 (e.g. ``[0.8, 0.1, 0.1]``).
        seed: seed of the permutation (independent of the global torch RNG).

    Returns:
        one int64 index tensor per part, each sorted by a random permutation within class.
    """
    n = labels.numel()
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    by_class = perm[torch.argsort(labels[perm], stable=True)]  # grouped by class, random within
    counts = torch.bincount(labels, minlength=NUM_CLASSES).double()
    k = len(fractions)
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
    starts = torch.cumsum(counts.long(), 0) - counts.long()
    parts: list[list[torch.Tensor]] = [[] for _ in range(k)]
    for c in range(counts.numel()):
        offset = int(starts[c])
        for j in range(k):
            parts[j].append(by_class[offset: offset + int(quota[c, j])])
            offset += int(quota[c, j])
    # shuffle each part once so the stored order is not grouped by class
    return [p[torch.randperm(p.numel(), generator=g)] for p in (torch.cat(ps) for ps in parts)]


class BatchIndexSampler:
    """Yields int64 index tensors of one batch each, over a shuffled (or ordered) range.

    Mirrors ``torch.utils.data.DistributedSampler``: the permutation depends on ``seed`` and the
    epoch (``set_epoch``, which Lightning calls before every epoch; without it the epoch counts
    up on each pass), so every rank draws the same permutation and takes the disjoint share
    ``perm[rank::world_size]``. Training shares are cut to equal length so all ranks run the
    same number of steps.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, drop_last: bool = False, seed: int = 0,
                 rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu"):
        self.n, self.batch_size, self.shuffle, self.drop_last = n, batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device = torch.device(device)  # where index batches are yielded: the data's device
        self.epoch = 0
        self._epoch_set = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._epoch_set = epoch, True

    def _share(self) -> int:
        if self.shuffle:  # training: equal shares
            return self.n // self.world_size
        return len(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        m = self._share()
        return m // self.batch_size if self.drop_last else -(-m // self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g)
            order = order[: self.n // self.world_size * self.world_size]
        else:
            order = torch.arange(self.n)
        order = order[self.rank:: self.world_size].to(self.device)  # one copy per epoch, not per step
        if not self._epoch_set:
            self.epoch += 1
        self._epoch_set = False
        stop = len(self) * self.batch_size
        for i in range(0, min(stop, order.numel()), self.batch_size):
            yield order[i: i + self.batch_size]


class InMemoryBatches:
    """An iterable of ``(images, labels)`` batches drawn by index from tensors held in memory.

    Lightning accepts it wherever a DataLoader goes. ``images`` float32 ``(B, 1, 28, 28)`` in [0, 1]
    (augmented if ``augment`` is given), ``labels`` int64 ``(B,)``, both on the device of the stored tensors.

    Args:
        images: uint8 ``(N, 28, 28)``.
        labels: int64 ``(N,)``.
        sampler: yields index batches (see :class:`BatchIndexSampler`).
        augment: batch augmentation ``(float batch, generator) -> float batch``, or ``None``.
        group: yield lists of ``group`` consecutive batches (the last one shorter when the batches do
            not divide evenly): one Lightning step for ``steps_per_execution`` mini-batches. The
            batches, their order and their augmentation are the same for every ``group``.
    """

    #: DataLoader's attribute names: Lightning finds ``sampler.set_epoch`` through them.
    batch_sampler = None

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, sampler: BatchIndexSampler, augment=None,
                 group: int = 1):
        self.images, self.labels, self.sampler, self.augment, self.group = images, labels, sampler, augment, group

    @property
    def minibatches(self) -> int:
        """Batches of ``batch_size`` per pass (``len`` counts groups of them)."""
        return len(self.sampler)

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.group)

    def __iter__(self) -> Iterator:
        batches = self._batches()
        if self.group == 1:
            yield from batches
            return
        group = []
        for batch in batches:
            group.append(batch)
            if len(group) == self.group:
                yield group
                group = []
        if group:
            yield group

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = self.images.device
        # augmentation randomness: its own generator, reseeded per epoch and rank, so runs repeat
        # and ranks draw independent augmentations
        s = self.sampler
        gen = torch.Generator(device=device).manual_seed((s.seed * 1_000_003 + s.epoch) * 1009 + s.rank + 1)
        for idx in s:  # index_select: ~10x faster than images[idx] for a uint8 batch on a CPU
            x = to_unit(self.images.index_select(0, idx))
            yield (self.augment(x, gen) if self.augment else x), self.labels.index_select(0, idx)


class MNISTDataModule(L.LightningDataModule):
    """MNIST, Fashion-MNIST or KMNIST in memory, with stratified splits, normalisation and augmentation.

    Args:
        root: data root holding ``<Dataset>/raw/<IDX files>`` (torchvision's layout). ``None``:
            ``$MNIST_LAB_DATA`` if set, else ``./data``.
        dataset: ``"mnist"``, ``"fashion_mnist"`` or ``"kmnist"``.
        split: ``"pooled"``: the 60k train and 10k test images pooled and split by ``fractions``
            (80/10/10 = 56,000 / 7,000 / 7,000 for MNIST); ``"official"``: the official 10k test
            set, validation a stratified ``val_fraction`` of the 60k train set (54,000 / 6,000 / 10,000).
        fractions: train/val/test fractions for ``pooled``; non-negative, summing to 1.
        val_fraction: validation fraction of the official train set for ``official``, in (0, 1).
        split_seed: seed of the splits; independent of the training seed, so the splits are the
            same on every run with the same ``split_seed``.
        normalize: the statistics the model normalises with (attributes ``mean``, ``std``, set by
            ``setup``): ``"standardize"``: mean and std of the train split's pixels in [0, 1];
            ``"rescale"``: 0 and 1, i.e. the model sees pixels in [0, 1].
        augment: per-image random affine on training batches (val and test are never augmented).
        augmentation: ``RandomAffineBatch`` arguments: ``degrees`` (default 10), ``translate``
            (fraction of width/height, default 0.1), ``zoom`` (default 0.1, i.e. scale 0.9-1.1).
        batch_size: training batch size (images).
        eval_batch_size: validation/test batch size (images).
        download: download through torchvision (in ``prepare_data``) when the files are missing.
        drop_last: drop the last, incomplete training batch.
        on_device: keep the splits on the trainer's device (GPU-resident data); ``False`` keeps
            them on the CPU and Lightning moves each batch.
        steps_per_execution: training batches per Lightning step: ``K > 1`` yields lists of ``K``
            batches (see :class:`InMemoryBatches`), which a Classifier with the same
            ``steps_per_execution`` trains one optimizer step each.

    Raises:
        ConfigError: any argument out of range (checked here, before any data is read).
        DataError: from ``prepare_data``/``setup``: files missing (and not downloadable) or corrupt.
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        dataset: str = "mnist",
        split: str = "pooled",
        fractions: Sequence[float] = (0.8, 0.1, 0.1),
        val_fraction: float = 0.1,
        split_seed: int = 0,
        normalize: str = "standardize",
        augment: bool = False,
        augmentation: dict | None = None,
        batch_size: int = 32,
        eval_batch_size: int = 1000,
        download: bool = True,
        drop_last: bool = False,
        on_device: bool = True,
        steps_per_execution: int = 1,
    ):
        super().__init__()
        if dataset not in DATASETS:
            raise ConfigError(f"unknown data.dataset={dataset!r}; choose one of {', '.join(DATASETS)}")
        if split not in SPLITS:
            raise ConfigError(f"unknown data.split={split!r}; choose one of {', '.join(SPLITS)}")
        if normalize not in NORMALIZATIONS:
            raise ConfigError(f"unknown data.normalize={normalize!r}; choose one of {', '.join(NORMALIZATIONS)}")
        fractions = [float(f) for f in fractions]
        if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
            raise ConfigError(f"data.fractions={fractions} must be three non-negative train/val/test "
                              f"fractions that sum to 1 (sum is {sum(fractions):.6g}), e.g. [0.8,0.1,0.1]")
        if fractions[0] == 0:
            raise ConfigError("data.fractions gives the train split 0; give it a positive fraction")
        if not 0 < val_fraction < 1:
            raise ConfigError(f"data.val_fraction={val_fraction} must be in (0, 1), e.g. 0.1")
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size),
                            ("steps_per_execution", steps_per_execution)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"data.{name}={value!r} must be a positive integer")
        if not isinstance(augment, bool):
            raise ConfigError(f"aug/data.augment must be true or false, got {augment!r} "
                              "(on the command line: +aug=true or +aug=false)")
        root = str(root) if root is not None else None  # plain types only in checkpoints (weights_only loading)
        self.save_hyperparameters()
        self.root = Path(root) if root is not None else default_data_root()
        self.dataset_cls = DATASETS[dataset]
        self.augmenter = RandomAffineBatch(**dict(augmentation or {})) if augment else None
        self.mean: float | None = None
        self.std: float | None = None
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.split_indices: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ files
    @property
    def raw_folder(self) -> Path:
        """Where the IDX files are expected: ``root/<DatasetClass>/raw``."""
        return self.root / self.dataset_cls.__name__ / "raw"

    def _file_names(self) -> list[str]:
        return [Path(url).stem if url.endswith(".gz") else Path(url).name for url, _ in self.dataset_cls.resources]

    def _missing(self) -> list[str]:
        return [f for f in self._file_names() if not (self.raw_folder / f).is_file()]

    def prepare_data(self) -> None:
        """Download the files through torchvision if they are missing and ``download`` is on.

        Raises:
            DataError: files missing and download off or failed; the message says where it looked
                and how to point mnist_lab at the files.
        """
        missing = self._missing()
        if not missing:
            return
        reason = "download is off (data.download=false)"
        if self.hparams.download:
            try:
                self.dataset_cls(str(self.root), train=True, download=True)
                return
            except Exception as e:  # torchvision raises RuntimeError/URLError per mirror
                reason = f"the download failed: {str(e).strip().splitlines()[0]}"
        raise DataError(
            f"{self.dataset_cls.__name__} not found: looked in {self.raw_folder.resolve()} for "
            f"{', '.join(missing)}, and {reason}. Point mnist_lab at a folder that holds "
            f"{self.dataset_cls.__name__}/raw/<those files>: set MNIST_LAB_DATA=/path/to/root "
            f"or pass data.root=/path/to/root (torchvision's layout)."
        )

    def _load(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        missing = self._missing()
        if missing:
            raise DataError(f"{self.dataset_cls.__name__} not found: looked in {self.raw_folder.resolve()} for "
                            f"{', '.join(missing)}. Call prepare_data() first (it downloads them), or point mnist_lab "
                            "at the files: MNIST_LAB_DATA=/path/to/root or data.root=/path/to/root")
        files = [self.raw_folder / n for n in self._file_names()]  # train images, labels; t10k images, labels
        return (*read_split(files[0], files[1], NUM_CLASSES), *read_split(files[2], files[3], NUM_CLASSES))

    # ------------------------------------------------------------------ splits
    def setup(self, stage: str | None = None) -> None:
        """Read the files (once), build the splits and the normalisation statistics, and place the
        splits on the trainer's device. Safe to call again (e.g. by Lightning after a manual call)."""
        if not self.splits:
            x_tr, y_tr, x_te, y_te = self._load()
            seed = self.hparams.split_seed
            if self.hparams.split == "pooled":
                x, y = torch.cat([x_tr, x_te]), torch.cat([y_tr, y_te])
                idx = stratified_split(y, self.hparams.fractions, seed)
                parts = {name: (x[i], y[i]) for name, i in zip(("train", "val", "test"), idx, strict=False)}
            else:
                vf = self.hparams.val_fraction
                idx = stratified_split(y_tr, [1 - vf, vf], seed) + [torch.arange(len(y_te))]
                parts = {"train": (x_tr[idx[0]], y_tr[idx[0]]), "val": (x_tr[idx[1]], y_tr[idx[1]]),
                         "test": (x_te, y_te)}
            self.split_indices = dict(zip(("train", "val", "test"), idx, strict=False))
            self.splits = {k: (v[0].contiguous(), v[1].contiguous()) for k, v in parts.items()}
            self.mean, self.std = self._train_stats()
        device = self._device()
        if device is not None:
            self.splits = {k: (x.to(device), y.to(device)) for k, (x, y) in self.splits.items()}

    def _train_stats(self) -> tuple[float, float]:
        if self.hparams.normalize == "rescale":
            return 0.0, 1.0
        x = self.splits["train"][0].to(torch.float64).div_(255.0)
        return float(x.mean()), float(x.std())

    def _device(self) -> torch.device | None:
        if not self.hparams.on_device or self.trainer is None:
            return None
        return self.trainer.strategy.root_device

    @property
    def split_sizes(self) -> dict[str, int]:
        """Number of images per split, e.g. ``{"train": 56000, "val": 7000, "test": 7000}``."""
        return {k: int(v[1].numel()) for k, v in self.splits.items()}

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES

    # ------------------------------------------------------------------ batches
    def _rank(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _batches(self, split: str, train: bool) -> InMemoryBatches:
        if not self.splits:
            raise RuntimeError("call setup() before asking for batches")
        x, y = self.splits[split]
        rank, world = self._rank()
        bs = self.hparams.batch_size if train else self.hparams.eval_batch_size
        # the shuffling seed follows the training seed (lightning.seed_everything / torch.manual_seed)
        sampler = BatchIndexSampler(len(y), bs, shuffle=train, drop_last=train and self.hparams.drop_last,
                                    seed=torch.initial_seed() % 2**31, rank=rank, world_size=world, device=x.device)
        return InMemoryBatches(x, y, sampler, self.augmenter if train else None,
                               group=self.hparams.steps_per_execution if train else 1)

    def train_dataloader(self) -> InMemoryBatches:
        return self._batches("train", train=True)

    def val_dataloader(self) -> InMemoryBatches:
        return self._batches("val", train=False)

    def test_dataloader(self) -> InMemoryBatches:
        return self._batches("test", train=False)
