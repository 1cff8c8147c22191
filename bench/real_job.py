"""MNIST test accuracy of a training recipe on the real job, and how well validation foresaw it.

Trains `train.py` (the default recipe plus any flags after `--`) on the 54,113 real MNIST training
digits of ../shared/data/mnist_train.csv.gz, once per seed, and scores each model once on the
10,000 MNIST test digits: "MNIST test accuracy (trained on 54,113 of the 60,000 training digits)".
The validation split that chooses the kept epoch and fits the temperature is one of:

- `random`: train.py's own (10%, stratified, seeded): what a user without writer ids gets;
- `writers`: whole NIST writers held out, about 10% of each series' rows (students and Census
  employees), read from mnist_train_writers.csv.gz: an estimate of accuracy on new handwriting.

Per model: the kept epoch's validation accuracy, test accuracy (all; rows 0-4,999, students;
rows 5,000-9,999, Census employees), with --tta, and the test ECE (15 bins) before and after
calibration; with several seeds, the ensemble with --tta and its ECE.

usage: python bench/real_job.py [--val-by random|writers] [--seeds 0 1 2] [--out F.json]
                                [--keep DIR] [-- TRAIN_FLAGS...]
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
from common import SHARED, machine

import dataset
import predict
import train

TRAIN = SHARED / "data" / "mnist_train.csv.gz"
TEST = SHARED / "data" / "mnist_test.csv.gz"
TRAIN_WRITERS = SHARED / "data" / "mnist_train_writers.csv.gz"
HALVES = {"students": slice(0, 5000), "employees": slice(5000, 10000)}  # rows of TEST


def read_writers(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Each row's NIST writer id and series."""
    table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
    return table[:, 0], table[:, 1]


def writer_split(
    writers: np.ndarray, series: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) row indices with whole writers in validation: in each series, writers
    in a seeded order until they hold `fraction` of that series' rows."""
    rng = np.random.default_rng(seed)
    held = []
    for s in np.unique(series):
        rows = np.flatnonzero(series == s)
        ids, counts = np.unique(writers[rows], return_counts=True)
        order = rng.permutation(len(ids))
        enough = np.searchsorted(np.cumsum(counts[order]), fraction * len(rows)) + 1
        held.append(rows[np.isin(writers[rows], ids[order[:enough]])])
    val = np.sort(np.concatenate(held))
    return np.setdiff1d(np.arange(len(writers)), val), val


@contextmanager
def validation_by_writers():
    """train.py's validation split made of whole writers (its fraction and seed as given)."""
    writers, series = read_writers(TRAIN_WRITERS)
    own = dataset.stratified_split

    def split(labels: np.ndarray, fraction: float, seed: int):
        if len(labels) != len(writers):
            raise SystemExit(
                f"{TRAIN_WRITERS}: {len(writers)} rows, the training CSV {len(labels)}"
            )
        return writer_split(writers, series, fraction, seed)

    dataset.stratified_split = split
    try:
        yield
    finally:
        dataset.stratified_split = own


def scored(members: list[str], folder: Path, tta: bool, labels: np.ndarray) -> dict:
    """predict.py on the test digits: accuracy, per half, and ECE before and after calibration."""
    folder.mkdir(parents=True, exist_ok=True)
    args = ["--checkpoint", *members, "--input", str(TEST), "--output", str(folder / "sub.csv")]
    summary = predict.main([*args, "--report-dir", str(folder)] + ["--tta"] * tta)
    with open(folder / "sub.csv", newline="") as f:
        predicted = np.array([int(row["Label"]) for row in csv.DictReader(f)])
    fit = json.loads((folder / "metrics.json").read_text())["calibration"]
    right = predicted == labels
    return {
        "test_acc": summary["accuracy"],
        **{f"test_acc_{half}": float(right[rows].mean()) for half, rows in HALVES.items()},
        "ece_before": fit["before"]["ece"],
        "ece_after": fit["after"]["ece"],
    }


def train_one(seed: int, folder: Path, flags: list[str], labels: np.ndarray) -> dict:
    """One model of the recipe: its training summary and its test figures."""
    where = ["--model-dir", str(folder), "--out-dir", str(folder)]
    data = ["--train", str(TRAIN), "--test", str(TEST), "--seed", str(seed)]
    summary = train.main([*data, *where, "--no-plots", "--quiet", *flags])
    best = str(folder / "best.pt")
    return {
        "seed": seed,
        "best_epoch": summary["best_epoch"],
        "val_acc": summary["best_val_acc"],
        "train_seconds": summary["train_seconds"],
        "wall_seconds": summary["wall_seconds"],
        "numerics": summary["numerics"],
        **scored([best], folder / "plain", False, labels),
        "tta": scored([best], folder / "tta", True, labels),
    }


def mean(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f}% +- {100 * sd:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--val-by", choices=("random", "writers"), default="random")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", type=Path, help="write every figure as JSON here")
    p.add_argument("--keep", type=Path, help="keep the models in KEEP/seedK/ (default: not kept)")
    p.add_argument("flags", nargs="*", help="train.py flags, after --")
    args = p.parse_args()
    labels = dataset.load_csv(TEST).labels
    split = validation_by_writers() if args.val_by == "writers" else nullcontext()
    record = {"machine": machine(), "val_by": args.val_by, "flags": args.flags, "models": []}
    with tempfile.TemporaryDirectory() as tmp, split:
        folders = [Path(args.keep or tmp) / f"seed{seed}" for seed in args.seeds]
        for seed, folder in zip(args.seeds, folders, strict=True):
            record["models"].append(train_one(seed, folder, args.flags, labels))
            print(json.dumps(record["models"][-1]), flush=True)
        if len(folders) > 1:
            members = [str(folder / "best.pt") for folder in folders]
            record["ensemble_tta"] = scored(members, Path(tmp) / "ensemble", True, labels)
    models = record["models"]
    print(
        f"\n{machine()}; train.py {' '.join(args.flags) or '(default recipe)'}; "
        f"validation by {args.val_by}; {len(models)} model(s)"
    )
    for key in ("val_acc", "test_acc", "test_acc_students", "test_acc_employees", "ece_after"):
        print(f"{key:20} {mean([m[key] for m in models])}")
    print(f"{'test_acc, --tta':20} {mean([m['tta']['test_acc'] for m in models])}")
    print(f"{'train minutes':20} {statistics.mean(m['train_seconds'] for m in models) / 60:.1f}")
    if "ensemble_tta" in record:
        print(f"ensemble, --tta: {json.dumps(record['ensemble_tta'])}")
    if args.out:
        args.out.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
