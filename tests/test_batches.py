"""MNISTCSV with a DataLoader, the on-device batch iterator, normalization, augmentation and the
split."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_table
from torch.utils.data import DataLoader

import dataset
from cli import UserError
from dataset import MNISTCSV, Augment, DeviceBatches, Normalize

RAW = Normalize(mean=0.0, std=1.0)  # pixels stay 0..1, so tests can read them back


def _labelled_by_ink(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Images whose first pixel equals 10 * label + 1 and whose centre pixel is the row number
    (mod 256), so a batch shows whether labels stay aligned and which rows it holds."""
    labels = np.arange(n) % 10
    images = np.zeros((n, 28, 28), np.uint8)
    images[:, 0, 0] = labels * 10 + 1
    images[:, 14, 14] = np.arange(n) % 256
    return images, labels


def _rows(xb: torch.Tensor) -> list[int]:
    return (xb[:, 0, 14, 14] * 255).round().long().tolist()


def test_mnistcsv_items_are_normalized_images_with_their_labels(write_csv):
    table = make_table(10, seed=1)
    x, y = MNISTCSV(write_csv("d.csv", table))[3]
    expected = (table[3, 1:].reshape(28, 28) / 255 - dataset.MNIST_MEAN) / dataset.MNIST_STD
    np.testing.assert_allclose(x[0].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert y == table[3, 0]


def test_mnistcsv_feeds_a_standard_dataloader(write_csv):
    table = make_table(10, seed=1)
    xb, yb = next(iter(DataLoader(MNISTCSV(write_csv("d.csv", table)), batch_size=4)))
    assert xb.shape == (4, 1, 28, 28)
    assert yb.tolist() == table[:4, 0].tolist()


def test_mnistcsv_unlabelled_items_are_images(write_csv):
    ds = MNISTCSV(write_csv("t.csv", make_table(3, labelled=False), "digit-recognizer-test"))
    assert ds[0].shape == (1, 28, 28)


@pytest.fixture
def shuffled():
    """103 rows in shuffled batches of 16 (the last partial one dropped), two passes."""
    images, labels = _labelled_by_ink(103)
    batches = DeviceBatches(images, labels, 16, normalize=RAW, shuffle_seed=1)
    return batches, [list(batches) for _ in range(2)]


def test_shuffled_batches_drop_the_last_partial_batch(shuffled):
    batches, (first, _) = shuffled
    assert [len(xb) for xb, _ in first] == [16] * 6
    assert len(batches) == 6


def test_shuffled_batches_keep_labels_aligned_with_their_images(shuffled):
    _, (first, _) = shuffled
    for xb, yb in first:
        np.testing.assert_allclose(xb[:, 0, 0, 0] * 255, yb.double() * 10 + 1, atol=1e-4)


def test_shuffled_batches_hold_distinct_rows(shuffled):
    _, (first, _) = shuffled
    rows = [row for xb, _ in first for row in _rows(xb)]
    assert len(set(rows)) == len(rows) == 96


def test_each_pass_shuffles_anew(shuffled):
    _, (first, second) = shuffled
    assert [_rows(xb) for xb, _ in first] != [_rows(xb) for xb, _ in second]


def test_the_same_seed_gives_the_same_order(shuffled):
    images, labels = _labelled_by_ink(103)
    _, (first, _) = shuffled
    again = DeviceBatches(images, labels, 16, normalize=RAW, shuffle_seed=1)
    assert [_rows(xb) for xb, _ in again] == [_rows(xb) for xb, _ in first]


def test_unshuffled_batches_hold_every_row_in_order():
    images, labels = _labelled_by_ink(20)
    batches = DeviceBatches(images, labels, 8, normalize=RAW)
    assert [row for xb, _ in batches for row in _rows(xb)] == list(range(20))


def test_batches_are_normalized():
    images, labels = _labelled_by_ink(20)
    xb, _ = next(iter(DeviceBatches(images, labels, 8, normalize=Normalize(0.5, 0.25))))
    assert xb[0, 0, 5, 5].item() == pytest.approx((0 - 0.5) / 0.25)


def test_batches_can_come_in_channels_last_memory_format():
    images, labels = _labelled_by_ink(4)
    xb, _ = next(iter(DeviceBatches(images, labels, 4, normalize=Normalize(channels_last=True))))
    assert xb.is_contiguous(memory_format=torch.channels_last)


def test_unlabelled_batches_have_no_labels():
    images, _ = _labelled_by_ink(20)
    assert [yb for _, yb in DeviceBatches(images, None, 8)] == [None, None, None]


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    images = dataset.load_csv(dataset.SAMPLE_DIR / "mnist_test.csv.gz").images[:64]
    return torch.from_numpy(images).float().div(255).unsqueeze(1)


def test_augmentation_distorts_every_image(digits):
    out = Augment()(digits, torch.Generator().manual_seed(0))
    assert ((out - digits).abs().flatten(1).sum(1) > 1).all()


def test_augmentation_keeps_the_ink_of_a_digit(digits):
    out = Augment()(digits, torch.Generator().manual_seed(0))
    ink_ratio = out.flatten(1).sum(1) / digits.flatten(1).sum(1)
    assert ink_ratio.min() > 0.7
    assert ink_ratio.max() < 1.4


def test_seeded_augmentation_is_reproducible(digits):
    first = Augment()(digits, torch.Generator().manual_seed(0))
    assert torch.equal(first, Augment()(digits, torch.Generator().manual_seed(0)))


def test_augmentation_without_distortions_is_the_identity(digits):
    identity = Augment(degrees=0, translate=0, scale=0, shear=0)(digits, torch.Generator())
    torch.testing.assert_close(identity, digits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(16, 1, 28, 28), (3, 1, 20, 28)])
def test_warp_resamples_where_torchs_affine_grid_points(shape):
    x = torch.rand(shape)
    theta = torch.randn(shape[0], 2, 3, generator=torch.Generator().manual_seed(0))
    grid = torch.nn.functional.affine_grid(theta, list(shape), align_corners=False)
    expected = torch.nn.functional.grid_sample(x, grid, align_corners=False)
    # the same grid up to rounding: a last-bit difference moves a sample by millionths of a pixel
    torch.testing.assert_close(dataset.warp(x, theta), expected, atol=1e-4, rtol=0)


def test_an_elastic_field_at_its_largest_everywhere_is_a_shift_of_that_many_pixels():
    x = torch.zeros(2, 1, 28, 28)
    x[:, :, 10:18, 10:18] = torch.rand(2, 1, 8, 8)
    augment = Augment(degrees=0, translate=0, scale=0, shear=0, elastic=2.0)
    draws = torch.zeros(2, augment.affine_columns + 2 * dataset.ELASTIC_POINTS**2)
    draws[0, augment.affine_columns :][: dataset.ELASTIC_POINTS**2] = 1.0  # every point: x + 2
    draws[1, augment.affine_columns :][dataset.ELASTIC_POINTS**2 :] = -1.0  # every point: y - 2
    out = augment.apply(x, draws)
    torch.testing.assert_close(out[0, :, 10:18, 8:16], x[0, :, 10:18, 10:18], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1, :, 12:20, 10:18], x[1, :, 10:18, 10:18], atol=1e-5, rtol=0)


def test_elastic_distortion_alone_moves_every_digit_and_keeps_its_ink(digits):
    elastic = Augment(degrees=0, translate=0, scale=0, shear=0, elastic=2.0)
    out = elastic(digits, torch.Generator().manual_seed(0))
    assert ((out - digits).abs().flatten(1).sum(1) > 1).all()
    ink_ratio = out.flatten(1).sum(1) / digits.flatten(1).sum(1)  # strokes stretch and shrink
    assert ink_ratio.min() > 0.6
    assert ink_ratio.max() < 1.6
    stream = torch.rand(3, 5, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert torch.equal(Augment().draw(3, torch.Generator().manual_seed(1)), stream)  # as it was


def test_mirroring_flips_about_half_of_the_images():
    x = torch.rand(64, 1, 28, 28)
    out = Augment(degrees=0, translate=0, scale=0, shear=0, hflip=True)(
        x, torch.Generator().manual_seed(0)
    )
    flipped = (out - x.flip(-1)).abs().flatten(1).amax(1) < 1e-5
    kept = (out - x).abs().flatten(1).amax(1) < 1e-5
    assert (flipped ^ kept).all()
    assert 16 < int(flipped.sum()) < 48


def test_the_fashion_policy_mirrors_and_shifts_without_rotating_or_shearing():
    fashion = Augment.for_classes(dataset.FASHION_CLASSES)
    assert (fashion.hflip, fashion.degrees, fashion.shear) == (True, 0, 0)


def test_digits_are_never_mirrored():
    assert not Augment.for_classes(dataset.DIGIT_CLASSES).hflip  # a mirrored 2 is no 2


@pytest.fixture
def labels() -> np.ndarray:
    return np.repeat(np.arange(10), [100, 200, 50, 100, 100, 100, 100, 100, 100, 150])


def test_stratified_split_is_a_partition(labels):
    train, val = dataset.stratified_split(labels, 0.2, seed=3)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels)))


def test_stratified_split_keeps_each_class_in_proportion(labels):
    _, val = dataset.stratified_split(labels, 0.2, seed=3)
    np.testing.assert_array_equal(np.bincount(labels[val]), np.bincount(labels) * 0.2)


def test_stratified_split_is_seeded(labels):
    train, _ = dataset.stratified_split(labels, 0.2, seed=3)
    np.testing.assert_array_equal(train, dataset.stratified_split(labels, 0.2, seed=3)[0])
    assert not np.array_equal(train, dataset.stratified_split(labels, 0.2, seed=4)[0])


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5])
def test_split_fraction_outside_zero_one_is_a_user_error(fraction):
    with pytest.raises(UserError, match="--val-split"):
        dataset.stratified_split(np.arange(10) % 10, fraction, seed=0)
