"""MNISTDataModule: splits, normalisation, batching, augmentation, and data/config errors."""

import math

import pytest
import torch
from conftest import centroid, synthetic_digits, write_idx, write_synthetic_mnist

from mnist_lab.data import BatchIndexSampler, InMemoryBatches, MNISTDataModule, stratified_split
from mnist_lab.errors import ConfigError, DataError
from mnist_lab.transforms import RandomAffineBatch, affine, to_unit


def datamodule(root, **kwargs) -> MNISTDataModule:
    dm = MNISTDataModule(root=root, download=False, **kwargs)
    dm.prepare_data()
    dm.setup()
    return dm


# ---------------------------------------------------------------- splits
def test_pooled_split_is_80_10_10_disjoint_complete_and_stratified(synthetic_root):
    dm = datamodule(synthetic_root)  # 900 + 100 synthetic images, 100 per class
    assert dm.split_sizes == {"train": 800, "val": 100, "test": 100}
    sets = [set(dm.split_indices[k].tolist()) for k in ("train", "val", "test")]
    assert sum(map(len, sets)) == 1000 and set.union(*sets) == set(range(1000))
    for split, per_class in (("train", 80), ("val", 10), ("test", 10)):
        assert torch.bincount(dm.splits[split][1], minlength=10).tolist() == [per_class] * 10


def test_official_split_keeps_the_official_test_set(synthetic_root):
    dm = datamodule(synthetic_root, split="official")
    assert dm.split_sizes == {"train": 810, "val": 90, "test": 100}
    _, test_labels = synthetic_digits(100, seed=1)  # what conftest wrote as t10k
    assert dm.splits["test"][1].tolist() == test_labels.tolist()
    assert torch.bincount(dm.splits["val"][1], minlength=10).tolist() == [9] * 10
    assert not set(dm.split_indices["train"].tolist()) & set(dm.split_indices["val"].tolist())


def test_splits_depend_on_split_seed_only(synthetic_root):
    torch.manual_seed(1)
    a = datamodule(synthetic_root)
    torch.manual_seed(2)  # a different training seed
    b = datamodule(synthetic_root)
    c = datamodule(synthetic_root, split_seed=1)
    for k in ("train", "val", "test"):
        assert torch.equal(a.split_indices[k], b.split_indices[k])
    assert not torch.equal(a.split_indices["val"], c.split_indices["val"])


def test_stratified_split_sizes_are_exact_with_uneven_classes():
    g = torch.Generator().manual_seed(0)
    labels = torch.multinomial(torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 8, 9, 10]), 7777, True, generator=g)
    parts = stratified_split(labels, [0.8, 0.1, 0.1], seed=3)
    assert [p.numel() for p in parts] == [7777 - 778 - 778, 778, 778]
    assert torch.cat(parts).sort().values.tolist() == list(range(7777))
    counts = torch.bincount(labels, minlength=10).double()
    for part, frac in zip(parts, (0.8, 0.1, 0.1), strict=False):
        share = torch.bincount(labels[part], minlength=10).double()
        assert (share - frac * counts).abs().max() < 1.5  # within one image of proportional (+ rounding)


# ---------------------------------------------------------------- normalisation
def test_standardize_uses_train_split_statistics(synthetic_root):
    dm = datamodule(synthetic_root)
    train = dm.splits["train"][0].double() / 255
    everything = torch.cat([dm.splits[k][0] for k in ("train", "val", "test")]).double() / 255
    assert dm.mean == pytest.approx(float(train.mean()), abs=1e-12)
    assert dm.std == pytest.approx(float(train.std()), abs=1e-12)
    assert abs(dm.mean - float(everything.mean())) > 1e-6  # not the pooled statistics
    x, _ = next(iter(dm.val_dataloader()))  # batches are [0, 1]; the model standardises
    assert x.shape == (100, 1, 28, 28) and x.dtype == torch.float32
    assert torch.allclose(x, dm.splits["val"][0].unsqueeze(1).float() / 255, atol=1e-7)
    z = (to_unit(dm.splits["train"][0]) - dm.mean) / dm.std
    assert float(z.mean()) == pytest.approx(0, abs=1e-4) and float(z.std()) == pytest.approx(1, abs=1e-4)


def test_rescale_maps_pixels_to_unit_interval(synthetic_root):
    dm = datamodule(synthetic_root, normalize="rescale")
    x, _ = next(iter(dm.val_dataloader()))
    assert (dm.mean, dm.std) == (0.0, 1.0)
    assert float(x.min()) >= 0 and float(x.max()) == 1.0


# ---------------------------------------------------------------- batches
def test_train_batches_cover_the_split_once_per_epoch_in_a_new_order(synthetic_root):
    dm = datamodule(synthetic_root, batch_size=64)
    loader = dm.train_dataloader()
    assert len(loader) == math.ceil(800 / 64)
    orders = []
    for epoch in (0, 1, 0):
        loader.sampler.set_epoch(epoch)
        idx = torch.cat(list(loader.sampler))
        assert sorted(idx.tolist()) == list(range(800))
        orders.append(idx)
    assert not torch.equal(orders[0], orders[1]) and torch.equal(orders[0], orders[2])
    x, y = next(iter(loader))
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_ranks_get_disjoint_equal_shares():
    shares = [torch.cat(list(BatchIndexSampler(101, 8, shuffle=True, seed=5, rank=r, world_size=2)))
              for r in (0, 1)]
    assert shares[0].numel() == shares[1].numel() == 50
    assert not set(shares[0].tolist()) & set(shares[1].tolist())
    evals = [torch.cat(list(BatchIndexSampler(101, 8, shuffle=False, rank=r, world_size=2))) for r in (0, 1)]
    assert sorted(torch.cat(evals).tolist()) == list(range(101))  # evaluation sees every image once


# ---------------------------------------------------------------- augmentation
def blob(n=1, size=28) -> torch.Tensor:
    x = torch.zeros(n, 1, size, size)
    x[:, :, 11:17, 9:19] = 1.0
    return x


def test_affine_matches_exact_reference_transforms():
    x = torch.zeros(2, 1, 28, 28)
    x[:, :, 3:8, 5:15] = 1
    x[:, :, 10:20, 20:23] = 0.5
    zero, one = torch.zeros(2), torch.ones(2)
    assert torch.allclose(affine(x, zero, torch.zeros(2, 2), one), x, atol=1e-5)
    assert torch.allclose(affine(x, torch.full((2,), 90.0), torch.zeros(2, 2), one),
                          torch.rot90(x, 1, (-2, -1)), atol=1e-5)  # counter-clockwise
    shifted = affine(x, zero, torch.tensor([[2.0, -3.0]] * 2), one)
    assert torch.allclose(shifted, torch.roll(x, (-3, 2), (-2, -1)), atol=1e-5)  # right 2, up 3
    zoomed = affine(blob(), torch.zeros(1), torch.zeros(1, 2), torch.tensor([1.5]))
    assert float(zoomed.sum()) == pytest.approx(float(blob().sum()) * 1.5**2, rel=0.02)


def test_augmentation_parameters_are_independent_per_image_and_within_bounds():
    aug = RandomAffineBatch(degrees=10, translate=0.1, zoom=0.1)
    angle, shift, scale = aug.sample(20000, 28, 28, "cpu", torch.Generator().manual_seed(0))
    assert float(angle.abs().max()) <= 10 and float(angle.abs().max()) > 9.9
    assert float(shift.abs().max()) <= 2.8 and float(shift.abs().max()) > 2.79
    assert float(scale.min()) >= 0.9 and float(scale.max()) <= 1.1
    # uniform on [-a, a]: mean 0, std a / sqrt(3)
    assert float(angle.std()) == pytest.approx(10 / math.sqrt(3), rel=0.03)
    assert float(scale.mean()) == pytest.approx(1.0, abs=0.002)
    assert abs(float(torch.corrcoef(torch.stack([angle, shift[:, 0], shift[:, 1], scale]))[0, 1:].abs().max())) < 0.03


def test_two_identical_images_in_one_batch_come_out_different():
    out = RandomAffineBatch()(blob(8), torch.Generator().manual_seed(0))
    diffs = (out[:, None] - out[None]).abs().flatten(2).amax(-1)
    assert float(diffs[~torch.eye(8, dtype=torch.bool)].min()) > 0.05


def test_ranks_draw_independent_augmentations():
    """Under DDP each rank augments with its own generator (seeded by seed, epoch and rank): the same
    digit, at the same position of rank 0's and rank 1's batch, comes out differently; each rank
    repeats itself for the same epoch."""
    images = (blob(16)[:, 0] * 255).to(torch.uint8)  # 16 copies of one digit

    def first_batch(rank):
        sampler = BatchIndexSampler(16, 8, shuffle=True, seed=3, rank=rank, world_size=2)
        sampler.set_epoch(0)
        return next(iter(InMemoryBatches(images, torch.zeros(16, dtype=torch.long), sampler,
                                    RandomAffineBatch())))[0]

    assert torch.equal(first_batch(0), first_batch(0))
    assert float((first_batch(0) - first_batch(1)).abs().flatten(1).amax(1).min()) > 0.05


def test_translation_only_moves_each_digit_by_at_most_ten_percent():
    aug = RandomAffineBatch(degrees=0, translate=0.1, zoom=0)
    x = blob(500)
    moved = centroid(aug(x, torch.Generator().manual_seed(1))) - centroid(x)
    assert float(moved.abs().max()) <= 2.8 + 0.05 and float(moved.abs().max()) > 2.5
    assert float(moved.std(0).min()) == pytest.approx(2.8 / math.sqrt(3), rel=0.1)


def test_val_and_test_batches_are_never_augmented(synthetic_root):
    dm = datamodule(synthetic_root, augment=True)
    for loader, split in ((dm.val_dataloader(), "val"), (dm.test_dataloader(), "test")):
        x, _ = next(iter(loader))
        assert torch.equal(x, to_unit(dm.splits[split][0][: len(x)]))
    raw = to_unit(dm.splits["train"][0][:64])
    augmented = dm.augmenter(raw, torch.Generator().manual_seed(0))
    assert (augmented - raw).abs().flatten(1).amax(1).min() > 0.1  # every training image changed
    assert MNISTDataModule(root=synthetic_root).augmenter is None  # off by default


# ---------------------------------------------------------------- errors
def test_missing_data_says_where_it_looked_and_how_to_fix(tmp_path):
    with pytest.raises(DataError) as err:
        datamodule(tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "MNIST" / "raw") in msg and "train-images-idx3-ubyte" in msg
    assert "MNIST_LAB_DATA" in msg and "data.root" in msg and "download is off" in msg


def test_only_prepare_data_downloads(tmp_path, monkeypatch):
    """Lightning's contract: prepare_data (rank 0) downloads, setup (every rank) only reads."""
    import torchvision

    def no_download(self):
        raise AssertionError("setup() must not download")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", no_download)
    with pytest.raises(DataError, match=r"MNIST not found: .* Call prepare_data\(\) first"):
        MNISTDataModule(root=tmp_path, download=True).setup()


def test_failed_download_is_reported_with_the_fix(tmp_path, monkeypatch):
    import torchvision

    def offline(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no network")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    dm = MNISTDataModule(root=tmp_path, download=True)
    with pytest.raises(DataError, match="the download failed: Error downloading .* MNIST_LAB_DATA"):
        dm.prepare_data()


@pytest.fixture
def copy_root(tmp_path):
    return write_synthetic_mnist(tmp_path, n_train=100, n_test=20)


def test_wrong_magic_number_is_reported(copy_root):
    f = copy_root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    f.write_bytes(b"\x00\x00\x08\x01" + f.read_bytes()[4:])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte is not a whole IDX images file: 78416 bytes "
                                        r"\(torchvision: .*\)\. Replace it with the original file"):
        datamodule(copy_root)


def test_truncated_file_is_reported(copy_root):
    f = copy_root / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-100])
    needs = r"not a whole IDX images file: 15596 bytes \(torchvision: shape '\[20, 28, 28\]' is invalid for input"
    with pytest.raises(DataError, match=needs):
        datamodule(copy_root)


def test_label_count_and_label_range_are_checked(copy_root):
    raw = copy_root / "MNIST" / "raw"
    write_idx(raw / "train-labels-idx1-ubyte", synthetic_digits(99, 0)[1])
    with pytest.raises(DataError, match="has 100 images but train-labels-idx1-ubyte has 99 labels"):
        datamodule(copy_root)
    labels = synthetic_digits(100, 0)[1]
    labels[5] = 12
    write_idx(raw / "train-labels-idx1-ubyte", labels)
    with pytest.raises(DataError, match="1 labels outside 0-9"):
        datamodule(copy_root)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"fractions": [0.8, 0.1, 0.2]}, r"must be three non-negative .* sum to 1 \(sum is 1.1\)"),
    ({"fractions": [1.1, -0.1, 0.0]}, "non-negative"),
    ({"dataset": "cifar10"}, "unknown data.dataset='cifar10'; choose one of mnist, fashion_mnist, kmnist"),
    ({"split": "random"}, "unknown data.split='random'"),
    ({"batch_size": 0}, "data.batch_size=0 must be a positive integer"),
    ({"val_fraction": 1.0}, "data.val_fraction=1.0 must be in"),
    ({"augment": "yes"}, r"must be true or false, got 'yes' \(on the command line: \+aug=true"),
    ({"augment": True, "augmentation": {"zoom": 1.5}}, "0 <= zoom < 1"),
])
def test_bad_data_config_is_rejected_before_any_data_is_read(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        MNISTDataModule(root=tmp_path / "does-not-exist", **kwargs)


def test_fashion_mnist_and_kmnist_use_their_own_folders(tmp_path):
    write_synthetic_mnist(tmp_path, n_train=100, n_test=20, dataset="KMNIST")
    assert datamodule(tmp_path, dataset="kmnist").split_sizes == {"train": 96, "val": 12, "test": 12}
    with pytest.raises(DataError, match="FashionMNIST not found: looked in .*FashionMNIST/raw"):
        datamodule(tmp_path, dataset="fashion_mnist")


# ---------------------------------------------------------------- real MNIST
def test_real_mnist_splits(real_root):
    pooled = datamodule(real_root)
    assert pooled.split_sizes == {"train": 56_000, "val": 7_000, "test": 7_000}
    official = datamodule(real_root, split="official")
    assert official.split_sizes == {"train": 54_000, "val": 6_000, "test": 10_000}
    counts = torch.bincount(pooled.splits["val"][1], minlength=10)
    total = torch.bincount(torch.cat([pooled.splits[k][1] for k in ("train", "val", "test")]), minlength=10)
    assert ((counts - total * 0.1).abs() <= 1).all()
    assert 0.12 < pooled.mean < 0.14 and 0.30 < pooled.std < 0.32  # MNIST's 0.1307 / 0.3081
