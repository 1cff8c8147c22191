"""What each architecture costs to train: MFLOP per training image (forward and backward, counted
by torch's FlopCounterMode) and training steps per second in fp32 and in bf16 autocast on this
CPU, measured one after the other in one run, and the share of the CPU's measured fp32 and bf16
matrix-multiply peak that this is.

usage: python bench/arch_cost.py [--arch NAME ...] [--batch-size 128] [--seconds 4]
The accuracy of each (on writers it never saw) comes from bench/cv_digits.py -- --arch NAME.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from common import machine
from study_archs import STUDY
from torch.utils.flop_counter import FlopCounterMode

import model


def training_step(net, x, y, optimizer, dtype) -> None:
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        loss = F.cross_entropy(net(x).float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def mflop_per_image(arch: str, batch: int) -> float:
    net = model.build(arch)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(net(x), y).backward()
    return counter.get_total_flops() / batch / 1e6


def images_per_second(arch: str, batch: int, dtype, seconds: float) -> float:
    """Training steps of `arch` in channels_last at `dtype` (None: fp32), after a warm-up."""
    torch.manual_seed(0)
    net = model.build(arch).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x = torch.randn(batch, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    for _ in range(3):
        training_step(net, x, y, optimizer, dtype)
    steps, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        training_step(net, x, y, optimizer, dtype)
        steps += 1
    return steps * batch / (time.perf_counter() - started)


def matmul_gflops(dtype) -> float:
    """The CPU's measured matrix-multiply rate (2048 x 2048) at `dtype`: the arithmetic limit."""
    a, b = (torch.randn(2048, 2048, dtype=dtype) for _ in range(2))
    for _ in range(2):
        a @ b
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < 2:
        a @ b
        runs += 1
    return runs * 2 * 2048**3 / (time.perf_counter() - started) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--arch",
        nargs="+",
        default=list(model.ARCHITECTURES),
        help=f"default: the project's architectures and the study's ({', '.join(STUDY)})",
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seconds", type=float, default=4.0, help="timed steps per measurement")
    args = p.parse_args()
    model.keep_freed_memory()
    peaks = {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}
    print(
        f"machine: {machine()}; matmul peak fp32 {peaks['fp32']:,.0f} GFLOP/s, bf16 "
        f"{peaks['bf16']:,.0f} GFLOP/s; batch {args.batch_size}, channels_last, AdamW\n"
    )
    print(
        "| arch | parameters | MFLOP/image | fp32 images/s | fp32 % of peak | bf16 images/s | "
        "bf16 % of peak |\n|---|---|---|---|---|---|---|"
    )
    for arch in args.arch:
        mflop = mflop_per_image(arch, args.batch_size)
        params = sum(p.numel() for p in model.build(arch).parameters())
        speeds = {
            name: images_per_second(arch, args.batch_size, dtype, args.seconds)
            for name, dtype in (("fp32", None), ("bf16", torch.bfloat16))
        }
        shares = {name: speeds[name] * mflop / 1e3 / peaks[name] for name in speeds}
        print(
            f"| `{arch}` | {params:,} | {mflop:.1f} | {speeds['fp32']:,.0f} | "
            f"{shares['fp32']:.0%} | {speeds['bf16']:,.0f} | {shares['bf16']:.0%} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
