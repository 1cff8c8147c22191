"""Whether torch.compile pays on a whole CPU training run: the same training steps eager, compiled
with an empty Inductor cache, and compiled again with that cache warm, each in a fresh process
timed from its start to its exit, for each numerics path this CPU has.

usage: python bench/compile_cost.py [--arch NAME] [--images N] [--batch-size 128]
--images defaults to a run of the default digits recipe on the 10,000 real digits (9,000 training
images a pass). Random inputs: what is timed is the arithmetic and the compilation, not the data.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from common import ROOT, machine

import config
import model

# One process: build the net, train `steps` steps (compiled or not), print the seconds of the
# first step and the images/s of the rest.
CHILD = """
import json, sys, time
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/bench"]
import torch
import model
from arch_cost import training_step
arch, steps, batch = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
compiled, dtype = sys.argv[5] == "1", None if sys.argv[6] == "fp32" else torch.bfloat16
model.keep_freed_memory()
torch.manual_seed(0)
net = model.build(arch).to(memory_format=torch.channels_last).train()
optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
forward = torch.compile(net) if compiled else net
x = torch.randn(batch, 1, 28, 28).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 10, (batch,))
t = time.perf_counter()
training_step(forward, x, y, optimizer, dtype)
first = time.perf_counter() - t
t = time.perf_counter()
for _ in range(steps - 1):
    training_step(forward, x, y, optimizer, dtype)
rate = (steps - 1) * batch / (time.perf_counter() - t)
print(json.dumps({"first_step_s": first, "images_per_s": rate}))
"""


def timed_child(args, steps: int, compiled: bool, path: str, cache: str) -> dict:
    """Wall seconds from process start to exit, and the child's own figures."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    cmd = [sys.executable, "-c", CHILD, str(ROOT), args.arch, str(steps), str(args.batch_size)]
    started = time.perf_counter()
    out = subprocess.run(
        [*cmd, "1" if compiled else "0", path], env=env, capture_output=True, text=True, check=True
    ).stdout
    return {"wall_s": time.perf_counter() - started, **json.loads(out.splitlines()[-1])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default=config.DIGITS.arch)
    p.add_argument("--images", type=int, default=9000 * config.DIGITS.epochs)
    p.add_argument("--batch-size", type=int, default=config.DIGITS.batch_size)
    args = p.parse_args()
    steps = args.images // args.batch_size
    paths = ["fp32", "bf16"] if model.cpu_has_native_bf16() else ["fp32"]
    print(
        f"machine: {machine()}; `{args.arch}`, {steps} training steps of {args.batch_size} "
        f"images, channels_last, AdamW\n"
    )
    print(
        "| path | run | process start to exit (s) | first step (s) | images/s after it |\n"
        "|---|---|---|---|---|"
    )
    for path in paths:
        with tempfile.TemporaryDirectory() as cache:
            runs = {
                "eager": timed_child(args, steps, False, path, cache),
                "torch.compile, empty cache": timed_child(args, steps, True, path, cache),
                "torch.compile, warm cache": timed_child(args, steps, True, path, cache),
            }
        for name, r in runs.items():
            print(
                f"| {path} | {name} | {r['wall_s']:.1f} | {r['first_step_s']:.2f} | "
                f"{r['images_per_s']:,.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
