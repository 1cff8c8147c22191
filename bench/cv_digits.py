"""5-fold cross-validation of a training recipe on the 10,000 real MNIST digits.

Each fold trains `train.py` (the default recipe plus any flags given after `--`) on 8,000 digits
and scores the other 2,000 with `predict.py`: every model alone, plain and with --tta, and with
--ensemble N the N models together. The folds are stratified and fixed (seed 0), so recipes are
compared on the same splits; model selection inside train.py uses its own validation split only.

usage: python bench/cv_digits.py [--folds 5] [--ensemble N] [--out results.json] [-- FLAGS...]
Data: ../shared/data/mnist_test.csv.gz (real digits, Kaggle's "MNIST in CSV" layout).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
from common import SHARED, machine, timed

import dataset
import predict
import train

REAL_DIGITS = SHARED / "data" / "mnist_test.csv.gz"


def stratified_folds(labels: np.ndarray, k: int, seed: int = 0) -> list[np.ndarray]:
    """k disjoint index sets, each holding about 1/k of every class."""
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        for j, part in enumerate(np.array_split(idx, k)):
            folds[j].extend(part.tolist())
    return [np.sort(np.array(f)) for f in folds]


def write_csv(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    table = np.column_stack([labels, images.reshape(len(images), -1)])
    header = ",".join(dataset.LAYOUTS["mnist-in-csv"][0])
    np.savetxt(path, table, fmt="%d", delimiter=",", header=header, comments="")


def score(checkpoints: list[str], test_csv: Path, tmp: Path, tta: bool) -> float:
    args = ["--checkpoint", *checkpoints, "--input", str(test_csv), "--no-report"]
    args += ["--output", str(tmp / "scored.csv")] + (["--tta"] if tta else [])
    return predict.main(args)["accuracy"]


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f}% +- {100 * sd:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--ensemble", type=int, default=1)
    p.add_argument("--out", type=Path, help="write every figure as JSON here")
    p.add_argument("flags", nargs="*", help="train.py flags, after --")
    args = p.parse_args()
    data = dataset.load_csv(REAL_DIGITS)
    folds = stratified_folds(data.labels, args.folds)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for k, test_idx in enumerate(folds):
            train_idx = np.setdiff1d(np.arange(len(data)), test_idx)
            train_csv, test_csv = tmp / f"train{k}.csv", tmp / f"test{k}.csv"
            write_csv(train_csv, data.images[train_idx], data.labels[train_idx])
            write_csv(test_csv, data.images[test_idx], data.labels[test_idx])
            run_dir = tmp / f"fold{k}"
            flags = ["--train", str(train_csv), "--no-plots", "--quiet"]
            flags += ["--ensemble", str(args.ensemble), "--model-dir", str(run_dir)]
            seconds, _ = timed(
                partial(train.main, [*flags, "--out-dir", str(run_dir), *args.flags])
            )
            if args.ensemble == 1:
                members = [str(run_dir / "best.pt")]
            else:
                members = [
                    str(train.member_dir(run_dir, s) / "best.pt") for s in range(args.ensemble)
                ]
            row = {
                "fold": k,
                "train_seconds": round(seconds, 1),
                "single": [score([m], test_csv, tmp, False) for m in members],
                "single_tta": [score([m], test_csv, tmp, True) for m in members],
            }
            if args.ensemble > 1:
                row["ensemble"] = score(members, test_csv, tmp, False)
                row["ensemble_tta"] = score(members, test_csv, tmp, True)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(
        f"\n{args.folds}-fold CV on {len(data):,} real digits ({REAL_DIGITS.name}); train.py "
        f"{' '.join(args.flags) or '(default recipe)'}; {machine()}; "
        f"mean train time per fold {statistics.mean(r['train_seconds'] for r in rows):.0f} s"
        + (f" for {args.ensemble} models" if args.ensemble > 1 else "")
    )
    summary = {
        "single model": mean_sd([a for r in rows for a in r["single"]]),
        "single model, --tta": mean_sd([a for r in rows for a in r["single_tta"]]),
    }
    if args.ensemble > 1:
        summary[f"ensemble of {args.ensemble}"] = mean_sd([r["ensemble"] for r in rows])
        summary[f"ensemble of {args.ensemble}, --tta"] = mean_sd([r["ensemble_tta"] for r in rows])
    for name, value in summary.items():
        print(f"{name:28} {value}")
    if args.out:
        args.out.write_text(json.dumps({"flags": args.flags, "folds": rows, **summary}, indent=1))


if __name__ == "__main__":
    main()
