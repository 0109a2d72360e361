"""Batches drawn by index from tensors held in memory: no ``Dataset.__getitem__`` per image, no
DataLoader workers (KellerJordan/airbench's on-device loader). Lightning accepts these iterables
wherever a DataLoader goes; :class:`mnist_lab.data.MNISTDataModule` makes them."""

import itertools
from collections.abc import Iterator

import torch

from mnist_lab.transforms import to_unit


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
    ``len`` counts batches, whatever ``group_ends``.

    Args:
        images: uint8 ``(N, 28, 28)``.
        labels: int64 ``(N,)``.
        sampler: yields index batches (see :class:`BatchIndexSampler`).
        augment: batch augmentation ``(float batch, generator) -> float batch``, or ``None``.

    Attributes:
        group_ends: ``None``: yield the batches one by one; else yield them in lists of consecutive batches
            (one Lightning step for several mini-batches, :mod:`mnist_lab.steps` sets it each epoch), the
            lists ending after these counts of batches, the last count where the pass stops. The batches,
            their order and their augmentation are the same either way.
    """

    #: DataLoader's attribute names: Lightning finds ``sampler.set_epoch`` through them.
    batch_sampler = None

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, sampler: BatchIndexSampler, augment=None):
        self.images, self.labels, self.sampler, self.augment = images, labels, sampler, augment
        self.group_ends: list[int] | None = None

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator:
        if self.group_ends is None:
            yield from self._batches()
            return
        batches, done = self._batches(), 0
        for end in self.group_ends:
            group = list(itertools.islice(batches, end - done))
            if not group:
                return
            yield group
            done = end

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = self.images.device
        # augmentation randomness: its own generator, reseeded per epoch and rank, so runs repeat
        # and ranks draw independent augmentations
        s = self.sampler
        gen = torch.Generator(device=device).manual_seed((s.seed * 1_000_003 + s.epoch) * 1009 + s.rank + 1)
        for idx in s:  # index_select: faster than images[idx] for a uint8 batch (docs/speed.md)
            x = to_unit(self.images.index_select(0, idx))
            yield (self.augment(x, gen) if self.augment else x), self.labels.index_select(0, idx)
