"""The architectures of the accuracy-per-FLOP study (docs/experiments.md), registered beside the
project's own when a bench script imports this module, so that `--arch NAME` reaches them there:
python bench/cv_digits.py -- --arch slim28 and python bench/arch_cost.py --arch slim28. None of
them paid enough to become a recipe; train.py and predict.py do not know them."""

from __future__ import annotations

from functools import partial

from torch import nn

from model import _conv_bn, register, small_bn, strong


def _head(channels: int, num_classes: int) -> list[nn.Module]:
    return [
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(channels, num_classes),
    ]


def _space_to_depth(num_classes: int = 10, *, a: int, b: int) -> nn.Module:
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


# name: builder(num_classes=10), registered for the bench scripts on import
BUILDERS = {
    "s2d64": partial(_space_to_depth, a=64, b=128),
    "s2d48": partial(_space_to_depth, a=48, b=96),
    "s2d32": partial(_space_to_depth, a=32, b=96),
    "s2d32w": partial(_space_to_depth, a=32, b=128),  # wider late layers
    "st5_48": st5_48,
    "slim28": slim28,
    "slimp": slimp,
    "strong24": partial(strong, width=24),
    "strong20": partial(strong, width=20),
    # the fast preset's network (small_bn: 24, 32) and its neighbours
    "small16_32": partial(small_bn, channels=(16, 32)),
    "small32_32": partial(small_bn, channels=(32, 32)),
    "small24_48": partial(small_bn, channels=(24, 48)),
    "small32_64": partial(small_bn, channels=(32, 64)),
    "small24_32d": partial(small_bn, dropout=0.25),
}
for name, builder in BUILDERS.items():
    register(name)(builder)
STUDY = tuple(BUILDERS)
