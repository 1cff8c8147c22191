"""Validation accuracy of a train.py recipe on writers it never saw, over seeds; the test set is
never read. How the fast preset was chosen (docs/experiments.md).

Trains `train.py` with the flags after `--` on ../shared/data/mnist_train.csv.gz, with its
validation split made of whole NIST writers (bench/real_job.py's split, 10%, seeded by --seed),
once per seed, and prints each run's kept-epoch validation accuracy and training seconds, then
their mean. The architectures of bench/study_archs.py are known here too (--arch small32_64).

usage: python bench/writer_val.py [--seeds 0 1 2 3] [--out F.jsonl] -- TRAIN_FLAGS...
e.g.   MNIST_PRECISION=fp32 python bench/writer_val.py -- --preset fast --epochs 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from common import machine
from real_job import TRAIN, mean, validation_by_writers
from study_archs import STUDY

import train


def one_run(flags: list[str], seed: int) -> dict:
    """One seed of the recipe: its kept epoch, validation accuracy and training time."""
    with tempfile.TemporaryDirectory() as tmp:
        where = ["--model-dir", tmp, "--out-dir", tmp, "--no-plots", "--quiet"]
        summary = train.main(["--train", str(TRAIN), "--seed", str(seed), *where, *flags])
    return {
        "flags": " ".join(flags),
        "seed": seed,
        "val_acc": summary["best_val_acc"],
        "best_epoch": summary["best_epoch"],
        "train_seconds": summary["train_seconds"],
        "images_per_s": summary["train_images_per_s"],
        "numerics": summary["numerics"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--out", type=Path, help="append each run as a JSON line here")
    p.add_argument(
        "flags", nargs="*", help=f"train.py flags, after --; --arch also takes {', '.join(STUDY)}"
    )
    args = p.parse_args()
    runs = []
    with validation_by_writers():
        for seed in args.seeds:
            runs.append(one_run(args.flags, seed))
            print(json.dumps(runs[-1]), flush=True)
            if args.out:
                with args.out.open("a") as f:
                    f.write(json.dumps(runs[-1]) + "\n")
    print(
        f"\n{machine()}; {runs[0]['numerics']}; train.py {' '.join(args.flags)}\n"
        f"validation by writers, seeds {' '.join(map(str, args.seeds))}: "
        f"{mean([r['val_acc'] for r in runs])}; "
        f"training {statistics.mean(r['train_seconds'] for r in runs):.1f} s"
    )


if __name__ == "__main__":
    main()
