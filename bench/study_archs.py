"""The architectures of the accuracy-per-FLOP study (docs/experiments.md), registered beside the
project's own when a bench script imports this module, so that `--arch NAME` reaches them there:
python bench/cv_digits.py -- --arch slim28 and python bench/arch_cost.py --arch slim28. None of
them paid enough to become a recipe; train.py and predict.py do not know them."""

from __future__ import annotations

from torch import nn

from model import _conv_bn, register, strong


def _head(channels: int, num_classes: int) -> list[nn.Module]:
    return [
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(channels, num_classes),
    ]


def _space_to_depth(num_classes: int, a: int, b: int) -> nn.Module:
    """28x28x1 -> 14x14x4 with no arithmetic, conv pairs of `a` at 14 and `b` at 7 pixels."""
    return nn.Sequential(
        nn.PixelUnshuffle(2),
        *_conv_bn(4, a),
        *_conv_bn(a, a),
        nn.MaxPool2d(2),
        *_conv_bn(a, b),
        *_conv_bn(b, b),
        *_head(b, num_classes),
    )


def _conv_pool_bn(cin: int, cout: int) -> list[nn.Module]:
    """A conv, max-pooling, then batch norm and ReLU on a quarter of the pixels."""
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    return [conv, nn.MaxPool2d(2), nn.BatchNorm2d(cout), nn.ReLU()]


@register("s2d64")
def s2d64(num_classes: int = 10) -> nn.Module:
    return _space_to_depth(num_classes, 64, 128)


@register("s2d48")
def s2d48(num_classes: int = 10) -> nn.Module:
    return _space_to_depth(num_classes, 48, 96)


@register("s2d32")
def s2d32(num_classes: int = 10) -> nn.Module:
    return _space_to_depth(num_classes, 32, 96)


@register("s2d32w")
def s2d32w(num_classes: int = 10) -> nn.Module:
    """Wider late layers: 32 channels at 14x14, 128 at 7x7."""
    return _space_to_depth(num_classes, 32, 128)


@register("st5_48")
def st5_48(num_classes: int = 10) -> nn.Module:
    """A 5x5 stride-2 stem to 14x14, conv pairs of 48 at 14 and 96 at 7 pixels."""
    stem = nn.Conv2d(1, 32, 5, stride=2, padding=2, bias=False)
    return nn.Sequential(
        stem,
        nn.BatchNorm2d(32),
        nn.ReLU(),
        *_conv_bn(32, 48),
        *_conv_bn(48, 48),
        nn.MaxPool2d(2),
        *_conv_bn(48, 96),
        *_conv_bn(96, 96),
        *_head(96, num_classes),
    )


@register("slim28")
def slim28(num_classes: int = 10) -> nn.Module:
    """Fewer channels at 28x28: one conv of 24 there, pairs of 48 at 14 and 96 at 7 pixels."""
    return nn.Sequential(
        *_conv_bn(1, 24),
        nn.MaxPool2d(2),
        *_conv_bn(24, 48),
        *_conv_bn(48, 48),
        nn.MaxPool2d(2),
        *_conv_bn(48, 96),
        *_conv_bn(96, 96),
        *_head(96, num_classes),
    )


@register("slimp")
def slimp(num_classes: int = 10) -> nn.Module:
    """`slim28` with batch norm and ReLU after each pooling instead of before it."""
    return nn.Sequential(
        *_conv_pool_bn(1, 24),
        *_conv_bn(24, 48),
        *_conv_pool_bn(48, 48),
        *_conv_bn(48, 96),
        *_conv_bn(96, 96),
        *_head(96, num_classes),
    )


@register("strong24")
def strong24(num_classes: int = 10) -> nn.Module:
    return strong(num_classes, width=24)


@register("strong20")
def strong20(num_classes: int = 10) -> nn.Module:
    return strong(num_classes, width=20)


STUDY = ("s2d64", "s2d48", "s2d32", "s2d32w", "st5_48", "slim28", "slimp", "strong24", "strong20")
