"""What one optimizer step costs beside a whole training step, for each of torch's three
implementations: a loop over the parameters (torch's default on the CPU), the multi-tensor
`foreach` one and the `fused` kernel that train.py uses on the CPU and on CUDA.

usage: python bench/optimizer_step.py [--archs basic_bn strong] [--optimizer adamw] [--steps 30]
Random inputs at each preset's batch size, fp32, channels_last, glibc keeping freed memory as in
train.py; the median of --steps steps.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from common import machine

import config
import model

IMPLEMENTATIONS = {
    "loop": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}
BATCH_SIZES = {recipe.arch: recipe.batch_size for recipe in config.PRESETS["fast"].values()}


def median_ms(fn, steps: int) -> float:
    """The median wall milliseconds of `fn()` over `steps` calls, after three warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def measure(arch: str, optimizer: str, implementation: str, steps: int) -> tuple[float, float]:
    """Milliseconds of one optimizer step alone and of one whole training step."""
    torch.manual_seed(0)
    net = model.build(arch).to(memory_format=torch.channels_last).train()
    kind, settings = config.OPTIMIZERS[optimizer]
    opt = kind(net.parameters(), lr=1e-3, **settings, **IMPLEMENTATIONS[implementation])
    batch = BATCH_SIZES.get(arch, config.DIGITS.batch_size)
    x = torch.randn(batch, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))

    def training_step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()

    whole = median_ms(training_step, steps)
    return median_ms(opt.step, steps), whole


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["basic_bn", "strong"])
    parser.add_argument("--optimizer", choices=config.OPTIMIZERS, default=config.Config.optimizer)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    model.keep_freed_memory()  # as train.py does on the CPU
    print(f"{machine()}; torch {torch.__version__}; {args.optimizer}, fp32")
    print(f"{'network':10} {'implementation':15} {'optimizer step ms':>18} {'whole step ms':>14}")
    for arch in args.archs:
        for implementation in IMPLEMENTATIONS:
            alone, whole = measure(arch, args.optimizer, implementation, args.steps)
            print(f"{arch:10} {implementation:15} {alone:18.2f} {whole:14.1f}")


if __name__ == "__main__":
    main()
