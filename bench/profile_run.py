"""Where a whole training run's time goes, and how far it is from the arithmetic limit.

Runs `train.py` (the default recipe unless flags follow `--`) in this process under
torch.profiler and sorts every operator's own time into convolution, the memory-bound layers
(batch norm, ReLU, pooling, casts and other elementwise work), the optimizer, augmentation and the
rest. Imports are timed apart; what neither accounts for is Python, autograd and dispatch
overhead, the parse and the checkpoints. The arithmetic limit is the FLOPs the run needs (training
images x MFLOP per training image, by FlopCounterMode) over this CPU's measured matmul peak at
the run's precision.

usage: python bench/profile_run.py [--train CSV] [--precision fp32|bf16] [-- TRAIN_FLAGS]
The profiler adds a few microseconds per operator: shares, not absolute times, are the result.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

from common import SHARED, machine

PROCESS_START = time.perf_counter()  # the interpreter's own start-up is not counted

# Operator name fragments, first match wins; checked against aten names such as
# aten::mkldnn_convolution, aten::native_batch_norm_backward, aten::_foreach_addcdiv_.
CATEGORIES = (
    ("convolution", ("convolution", "conv2d")),
    ("optimizer", ("_foreach", "adam", "lerp", "addcdiv", "addcmul", "sqrt")),
    ("augmentation", ("grid_sampler", "affine_grid", "bmm")),  # bmm: warp's sampling grid
    ("linear and loss", ("addmm", "::mm", "linear", "log_softmax", "nll_loss", "cross_entropy")),
    (
        "memory-bound layers",
        ("batch_norm", "pool", "relu", "threshold", "clamp", "copy", "_to_", "fill", "bernoulli"),
    ),
)


def category(name: str) -> str:
    for label, fragments in CATEGORIES:
        if any(f in name.lower() for f in fragments):
            return label
    return "other operators"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", default=str(SHARED / "data" / "mnist_test.csv.gz"))
    p.add_argument("--precision", default="auto")
    p.add_argument("flags", nargs="*", help="train.py flags, after --")
    args = p.parse_args()
    import torch
    from arch_cost import matmul_gflops, mflop_per_image

    import train

    imported = time.perf_counter() - PROCESS_START
    with tempfile.TemporaryDirectory() as tmp:
        flags = ["--train", args.train, "--precision", args.precision, "--quiet", "--no-plots"]
        flags += ["--model-dir", tmp, "--out-dir", tmp, *args.flags]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            train.main(flags)
        wall = time.perf_counter() - PROCESS_START
        metrics = json.loads((Path(tmp) / "metrics.json").read_text())
    seconds: dict[str, float] = collections.Counter()
    for event in prof.key_averages():
        seconds[category(event.key)] += event.self_cpu_time_total / 1e6
    seconds["imports (torch, numpy, the project)"] = imported
    seconds["the rest: Python, autograd and dispatch overhead, parse, checkpoints"] = wall - sum(
        seconds.values()
    )
    cfg = metrics["config"]
    images = metrics["train_images"] * cfg["epochs"]
    peak = matmul_gflops(torch.float32 if "fp32" in metrics["numerics"] else torch.bfloat16)
    gflop = images * mflop_per_image(cfg["arch"], 128) / 1e3
    print(f"machine: {machine()}; train.py {' '.join(args.flags) or '(default recipe)'}")
    print(
        f"`{cfg['arch']}`, {cfg['epochs']} epochs, {images:,} training images; "
        f"{metrics['numerics']}; {metrics['train_seconds']:.1f} s in the training passes\n"
    )
    print("| where | seconds | share of the run |\n|---|---|---|")
    for name, value in sorted(seconds.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {value:.1f} | {value / wall:.0%} |")
    print(f"| **whole run, process start to exit** | **{wall:.1f}** | 100% |")
    print(
        f"\narithmetic limit: {gflop / peak:.1f} s ({gflop:,.0f} GFLOP of training at the "
        f"measured {peak:,.0f} GFLOP/s matmul peak); the run took {wall / (gflop / peak):.1f}x that"
    )


if __name__ == "__main__":
    main()
