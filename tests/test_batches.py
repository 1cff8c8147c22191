"""MNISTCSV with a DataLoader, the on-device batch iterator, augmentation and the split."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_table
from torch.utils.data import DataLoader

import dataset
from dataset import MNISTCSV, Augment, DeviceBatches


def _labelled_by_ink(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Images whose first pixel equals 10 * label + 1, so a batch shows if labels stay aligned."""
    labels = np.arange(n) % 10
    images = np.zeros((n, 28, 28), np.uint8)
    images[:, 0, 0] = labels * 10 + 1
    images[:, 14, 14] = np.arange(n) % 256
    return images, labels


def test_mnistcsv_feeds_a_standard_dataloader(write_csv):
    table = make_table(10, seed=1)
    ds = MNISTCSV(write_csv("d.csv", table))
    x, y = ds[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == table[3, 0]
    expected = (table[3, 1:].reshape(28, 28) / 255 - dataset.MNIST_MEAN) / dataset.MNIST_STD
    np.testing.assert_allclose(x[0].numpy(), expected, rtol=1e-5, atol=1e-6)
    xb, yb = next(iter(DataLoader(ds, batch_size=4)))
    assert xb.shape == (4, 1, 28, 28) and yb.tolist() == table[:4, 0].tolist()


def test_mnistcsv_unlabelled_items_are_images(write_csv):
    ds = MNISTCSV(write_csv("t.csv", make_table(3, labelled=False), "digit-recognizer-test"))
    assert ds[0].shape == (1, 28, 28)


def test_device_batches_cover_every_row_once_in_aligned_shuffled_batches():
    images, labels = _labelled_by_ink(103)
    batches = DeviceBatches(images, labels, batch_size=16, shuffle=True, seed=1, mean=0, std=1)
    assert len(batches) == 7
    seen = []
    for _ in range(2):
        order = []
        for xb, yb in batches:
            assert xb.shape[1:] == (1, 28, 28) and xb.dtype == torch.float32
            np.testing.assert_allclose(xb[:, 0, 0, 0] * 255, yb.double() * 10 + 1, atol=1e-4)
            order += (xb[:, 0, 14, 14] * 255).round().long().tolist()
        assert sorted(order) == sorted(np.arange(103) % 256)
        seen.append(order)
    assert seen[0] != seen[1], "each epoch must shuffle anew"
    assert seen[0] != sorted(seen[0])
    again = DeviceBatches(images, labels, batch_size=16, shuffle=True, seed=1, mean=0, std=1)
    assert [int(v) for xb, _ in again for v in (xb[:, 0, 14, 14] * 255).round()] == seen[0]


def test_device_batches_normalize_and_drop_last():
    images, labels = _labelled_by_ink(20)
    batches = DeviceBatches(images, labels, batch_size=8, drop_last=True, mean=0.5, std=0.25)
    sizes = [len(xb) for xb, _ in batches]
    assert sizes == [8, 8]
    xb, _ = next(iter(batches))
    assert torch.allclose(xb[0, 0, 5, 5], torch.tensor((0 - 0.5) / 0.25))
    unlabelled = DeviceBatches(images, None, batch_size=8)
    assert [yb for _, yb in unlabelled] == [None, None, None]


def test_augmentation_moves_ink_but_keeps_a_digit():
    data = dataset.load_csv(dataset.SAMPLE_DIR / "mnist_test.csv.gz")
    x = torch.from_numpy(data.images[:64]).float().div(255).unsqueeze(1)
    out = Augment()(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    changed = (out - x).abs().flatten(1).sum(1)
    assert (changed > 1).all(), "every image is distorted"
    ink_ratio = out.flatten(1).sum(1) / x.flatten(1).sum(1)
    assert ink_ratio.min() > 0.7 and ink_ratio.max() < 1.4, "no digit is lost or blown up"
    same = Augment()(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, same), "seeded augmentation is reproducible"
    identity = Augment(degrees=0, translate=0, scale=0, shear=0)(x, torch.Generator())
    torch.testing.assert_close(identity, x, atol=1e-5, rtol=0)


def test_fashion_policy_mirrors_about_half_and_digits_are_never_mirrored():
    x = torch.rand(64, 1, 28, 28)
    mirror = Augment(degrees=0, translate=0, scale=0, shear=0, hflip=True)
    out = mirror(x, torch.Generator().manual_seed(0))
    flipped = (out - x.flip(-1)).abs().flatten(1).amax(1) < 1e-5
    kept = (out - x).abs().flatten(1).amax(1) < 1e-5
    assert (flipped ^ kept).all() and 16 < int(flipped.sum()) < 48
    fashion = Augment.for_classes(dataset.FASHION_CLASSES)
    assert fashion.hflip and fashion.degrees == fashion.shear == 0
    assert not Augment.for_classes(dataset.DIGIT_CLASSES).hflip  # a mirrored 2 is no 2


def test_stratified_split_is_seeded_disjoint_and_proportional():
    labels = np.repeat(np.arange(10), [100, 200, 50, 100, 100, 100, 100, 100, 100, 150])
    train, val = dataset.stratified_split(labels, 0.2, seed=3)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == len(labels)
    np.testing.assert_array_equal(np.bincount(labels[val]), np.bincount(labels) * 0.2)
    again, _ = dataset.stratified_split(labels, 0.2, seed=3)
    other, _ = dataset.stratified_split(labels, 0.2, seed=4)
    np.testing.assert_array_equal(train, again)
    assert not np.array_equal(train, other)


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5])
def test_split_fraction_outside_zero_one_is_a_user_error(fraction):
    with pytest.raises(dataset.UserError, match="--val-split"):
        dataset.stratified_split(np.arange(10) % 10, fraction, seed=0)
