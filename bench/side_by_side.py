"""The project side by side with the peer (../shared/bench/peer_seed.py) in one run.

Same files, one table: CSV parse, cached load, training throughput, time to the peer's accuracy,
inference throughput, peak memory. The project runs once per numerics path: its default on this
CPU (bf16 autocast where the CPU computes bf16 natively) and fp32, the path of CPUs without it.

usage: python bench/side_by_side.py [--train CSV] [--test CSV] [--epochs N] [--device DEV]
                                    [-- TRAIN_FLAGS]
Default files: ../shared/data/fashion-mnist_{train,test}.csv.gz (60,000 + 10,000 rows). The peer
trains for --epochs (15); the project runs `python train.py --preset fast` (or TRAIN_FLAGS) from an
empty parse cache, and the clock runs from process start to exit for both. Prints a Markdown table.
To stand in for a CPU with only AVX2 (both sides, fp32), run it with
ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 in the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import PEER, ROOT, SHARED, machine, numerics_paths

# Reading both files as each side does at the start of training: the peer with pandas and its
# float conversion, the project with dataset.read_csv (no cache), then dataset.load_csv twice
# (fill the cache, then read it). Prints one JSON line of seconds.
LOADS = """
import json, sys, time
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import pandas as pd
import dataset
from peer_seed import CSVDataset
def clock(fn):
    t = time.perf_counter(); fn(); return time.perf_counter() - t
files = sys.argv[3:]
peer = clock(lambda: [CSVDataset(pd.read_csv(f)) for f in files])
parse = clock(lambda: [dataset.read_csv(f) for f in files])
[dataset.load_csv(f) for f in files]
cached = clock(lambda: [dataset.load_csv(f) for f in files])
print(json.dumps({"peer": peer, "parse": parse, "cached": cached}))
"""

# The peer's evaluation loop as peer_seed.py runs it (DataLoader(100), fp32) against
# predict.Ensemble on the same test file and the project's trained checkpoint; images/s each.
INFERENCE = """
import json, sys, time
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import pandas as pd, torch
from torch.utils.data import DataLoader
import cli, dataset, model, predict
from peer_seed import CNN, CSVDataset
device, precision = model.setup_device(sys.argv[5], sys.argv[6])
ds = CSVDataset(pd.read_csv(sys.argv[3]))
net = CNN().eval()
t = time.perf_counter()
with torch.no_grad():
    for x, _ in DataLoader(ds, batch_size=100):
        net(x).argmax(1)
peer = len(ds) / (time.perf_counter() - t)
images = dataset.load_csv(sys.argv[3]).images
ens = predict.Ensemble([sys.argv[4]], device, precision)
ens.predict_proba(images[:cli.EVAL_BATCH_SIZE])  # first-call set-up, as the peer pays
t = time.perf_counter()
ens.predict_proba(images)
print(json.dumps({"peer": peer, "project": len(images) / (time.perf_counter() - t)}))
"""


# Where LOADS and INFERENCE import from: the project's modules and the peer's.
IMPORT_PATHS = [str(ROOT), str(PEER.parent)]


def run(cmd: list[str], env: dict) -> tuple[float, int, str]:
    """Wall seconds from process start to exit, peak RSS in bytes, and stdout of one command."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        code = os.waitstatus_to_exitcode(status)
        if code:
            err.seek(0)
            sys.exit(f"{' '.join(cmd[:3])}: exit {code}\n{err.read()[-2000:]}")
        out.seek(0)
        return wall, usage.ru_maxrss * 1024, out.read()


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def run_project(args, flags: list[str], precision: str, tmp: Path, env: dict) -> dict:
    """Train from an empty parse cache, then time inference with its best.pt, at `precision`."""
    folder = tmp / precision
    env = {**env, "MNIST_CACHE_DIR": str(folder / "cache")}
    cmd = [sys.executable, str(ROOT / "train.py"), "--train", args.train, "--test", args.test]
    cmd += ["--device", args.device, "--precision", precision, "--quiet"]
    cmd += ["--out-dir", str(folder / "out"), "--model-dir", str(folder / "models"), *flags]
    wall, rss, _ = run(cmd, env)
    metrics = json.loads((folder / "out" / "metrics.json").read_text())
    best = str(folder / "models" / "best.pt")
    inference = [sys.executable, "-c", INFERENCE, *IMPORT_PATHS, args.test, best, args.device]
    inference.append(precision)
    return {
        "wall": wall,
        "rss": rss,
        "metrics": metrics,
        "inference": last_json(run(inference, env)[2]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", default=str(SHARED / "data/fashion-mnist_train.csv.gz"))
    p.add_argument("--test", default=str(SHARED / "data/fashion-mnist_test.csv.gz"))
    p.add_argument("--epochs", type=int, default=15, help="the peer's epochs")
    p.add_argument("--device", default="cpu", help="the project's device")
    p.add_argument(
        "train_flags", nargs="*", help="after --: train.py flags (default --preset fast)"
    )
    args = p.parse_args()
    flags = args.train_flags or ["--preset", "fast"]
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "MNIST_CACHE_DIR": str(tmp / "cache")}
        peer_wall, peer_rss, peer_out = run(
            [py, str(PEER), args.train, args.test, str(args.epochs)], env
        )
        peer = last_json(peer_out)
        names = numerics_paths(args.device)
        ours = {path: run_project(args, flags, path, tmp, env) for path in names}
        loads = last_json(run([py, "-c", LOADS, *IMPORT_PATHS, args.train, args.test], env)[2])
    peer_ips = peer["train_rows"] / statistics.mean(peer["epoch_s"])
    peer_inference = statistics.mean(o["inference"]["peer"] for o in ours.values())
    cached = "cached load, both files (s; the peer parses again)"
    rows = [
        ("CSV parse, both files (s)", loads["peer"], lambda o: loads["parse"], "{:.2f}", True),
        (cached, loads["peer"], lambda o: loads["cached"], "{:.3f}", True),
        (
            "training throughput (images/s)",
            peer_ips,
            lambda o: o["metrics"]["train_images_per_s"],
            "{:,.0f}",
            False,
        ),
        ("wall time, process start to exit (s)", peer_wall, lambda o: o["wall"], "{:.1f}", True),
        (
            "inference (images/s)",
            peer_inference,
            lambda o: o["inference"]["project"],
            "{:,.0f}",
            False,
        ),
        (
            "peak memory, training process (MB)",
            peer_rss / 1e6,
            lambda o: o["rss"] / 1e6,
            "{:,.0f}",
            True,
        ),
    ]
    print(f"machine: {machine()}; project device {args.device}, the peer as written (CPU, fp32)")
    print(
        f"files: {Path(args.train).name}, {Path(args.test).name}; peer: {args.epochs} "
        f"epochs; project: train.py {' '.join(flags)}"
    )
    header = "".join(f" project, {names[path]} | vs peer |" for path in ours)
    print(f"\n| measure | peer |{header}\n|---|---|" + "---|---|" * len(ours))
    for name, theirs, mine, fmt, lower_is_better in rows:
        cells = ""
        for o in ours.values():
            ratio = theirs / mine(o) if lower_is_better else mine(o) / theirs
            cells += f" {fmt.format(mine(o))} | {ratio:.2f}x |"
        print(f"| {name} | {fmt.format(theirs)} |{cells}")
    accuracy = "".join(
        f" {o['metrics']['test_acc']:.2%} | "
        f"{'at least the peer' if o['metrics']['test_acc'] >= peer['test_acc'] else 'below'} |"
        for o in ours.values()
    )
    print(f"| test accuracy | {peer['test_acc']:.2%} |{accuracy}")
    for path, o in ours.items():
        met = o["metrics"]["test_acc"] >= peer["test_acc"]
        print(
            f"\n{names[path]}: the peer's accuracy {'met' if met else 'NOT met'} in "
            f"{o['wall']:.1f} s, {peer_wall / o['wall']:.2f}x faster than the peer's "
            f"{peer_wall:.1f} s (target: 10x)"
        )


if __name__ == "__main__":
    main()
