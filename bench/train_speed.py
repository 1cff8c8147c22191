"""Training throughput of `--arch basic`, side by side with the peer (../shared/bench/peer_seed.py)
on the same files in one run.

usage: python bench/train_speed.py [--epochs N] [--device DEV] [TRAIN_CSV TEST_CSV]
Default files: ../shared/data/fashion-mnist_{train,test}.csv.gz (60,000 + 10,000 rows).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
PEER = SHARED / "bench" / "peer_seed.py"


def run_json(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("train_csv", nargs="?", default=str(SHARED / "data/fashion-mnist_train.csv.gz"))
    p.add_argument("test_csv", nargs="?", default=str(SHARED / "data/fashion-mnist_test.csv.gz"))
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    peer = run_json([sys.executable, str(PEER), args.train_csv, args.test_csv, "1"])
    peer_ips = peer["train_rows"] / peer["epoch_s"][0]
    rows = [("peer: per-row Dataset, DataLoader(100), fp32", peer_ips, peer["epoch_s"][0])]
    with tempfile.TemporaryDirectory() as tmp:
        for augment in ("--augment", "--no-augment"):
            out = Path(tmp) / augment
            cmd = [
                sys.executable, str(ROOT / "train.py"), "--train", args.train_csv,
                "--test", args.test_csv, "--arch", "basic", "--epochs", str(args.epochs),
                "--device", args.device, "--no-plots", "--quiet",
                "--out-dir", str(out), "--model-dir", str(out), augment,
            ]  # fmt: skip
            subprocess.run(cmd, check=True, capture_output=True, env=os.environ)
            metrics = json.loads((out / "metrics.json").read_text())
            ips = metrics["train_images_per_s"]
            label = (
                f"project: basic, {'augmented' if augment == '--augment' else 'no augmentation'}"
            )
            rows.append((label, ips, metrics["train_images"] / ips))
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; device {args.device}; "
        f"file {Path(args.train_csv).name}"
    )
    print(f"{'contender':48} {'images/s':>9} {'s/epoch':>8} {'vs peer':>8}")
    for name, ips, epoch_s in rows:
        print(f"{name:48} {ips:9,.0f} {epoch_s:8.1f} {ips / peer_ips:7.2f}x")


if __name__ == "__main__":
    main()
