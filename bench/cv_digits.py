"""Accuracy of a training recipe on the 10,000 real MNIST digits, on writers it never saw.

Rows 0-4,999 of the file come from NIST SD-1 (students) and rows 5,000-9,999 from SD-3 (Census
employees): one writer (22 digits) is in both halves, no other. The default protocol, `writers`,
trains on one half and scores the other, both ways, and averages: accuracy on new handwriting.
`folds` is stratified k-fold cross-validation over all 10,000, which puts one writer's digits on
both sides and overstates that accuracy (kept to compare with earlier figures).

Each split trains `train.py` (the default recipe plus any flags given after `--`) and scores the
held-out digits with `predict.py`: every model alone, plain and with --tta, and with --ensemble N
the N models together; and each model's expected calibration error there, before and after the
temperature train.py fitted on its validation split. Model selection and calibration inside
train.py use its own validation split only.

usage: python bench/cv_digits.py [--protocol writers|folds] [--folds 5] [--ensemble N]
                                 [--out results.json] [-- FLAGS...]
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
from study_archs import STUDY

import dataset
import parallel
import predict
import train

REAL_DIGITS = SHARED / "data" / "mnist_test.csv.gz"
WRITERS = {"SD-1 -> SD-3": slice(5000, 10000), "SD-3 -> SD-1": slice(0, 5000)}  # test rows


def stratified_folds(labels: np.ndarray, k: int, seed: int = 0) -> list[np.ndarray]:
    """k disjoint index sets, each holding about 1/k of every class."""
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        for j, part in enumerate(np.array_split(rows, k)):
            folds[j].extend(part.tolist())
    return [np.sort(np.array(f)) for f in folds]


def test_sets(labels: np.ndarray, protocol: str, folds: int) -> dict[str, np.ndarray]:
    """The held-out rows of each split, by name."""
    if protocol == "writers":
        rows = np.arange(len(labels))
        return {name: rows[half] for name, half in WRITERS.items()}
    return {f"fold {k}": test for k, test in enumerate(stratified_folds(labels, folds))}


def write_csv(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    table = np.column_stack([labels, images.reshape(len(images), -1)])
    header = ",".join(dataset.LAYOUTS["mnist-in-csv"][0])
    np.savetxt(path, table, fmt="%d", delimiter=",", header=header, comments="")


def score(checkpoints: list[str], test_csv: Path, tmp: Path, tta: bool) -> float:
    args = ["--checkpoint", *checkpoints, "--input", str(test_csv), "--no-report"]
    args += ["--output", str(tmp / "scored.csv")] + (["--tta"] if tta else [])
    return predict.main(args)["accuracy"]


def scored_with_calibration(
    checkpoints: list[str], test_csv: Path, tmp: Path, tta: bool
) -> tuple[float, dict[str, float]]:
    """The accuracy of a model (or ensemble) on the held-out digits and its expected calibration
    error there, before and after the temperatures, from one predict.py run with its report."""
    args = ["--checkpoint", *checkpoints, "--input", str(test_csv), "--report-dir", str(tmp)]
    summary = predict.main(
        [*args, "--output", str(tmp / "scored.csv")] + (["--tta"] if tta else [])
    )
    fit = json.loads((tmp / "metrics.json").read_text())["calibration"]
    return summary["accuracy"], {"before": fit["before"]["ece"], "after": fit["after"]["ece"]}


def run_split(data, test_rows: np.ndarray, folder: Path, args) -> dict:
    """Train on every row but `test_rows`, score those: the split's figures."""
    train_rows = np.setdiff1d(np.arange(len(data)), test_rows)
    folder.mkdir()
    train_csv, test_csv = folder / "train.csv", folder / "test.csv"
    write_csv(train_csv, data.images[train_rows], data.labels[train_rows])
    write_csv(test_csv, data.images[test_rows], data.labels[test_rows])
    flags = ["--train", str(train_csv), "--no-plots", "--quiet", "--ensemble", str(args.ensemble)]
    flags += ["--model-dir", str(folder), "--out-dir", str(folder), *args.flags]
    seconds, _ = timed(partial(train.main, flags))
    members = [str(folder / "best.pt")]
    if args.ensemble > 1:
        members = [str(parallel.member_dir(folder, s) / "best.pt") for s in range(args.ensemble)]
    single = [
        scored_with_calibration([m], test_csv, folder / f"report{k}", False)
        for k, m in enumerate(members)
    ]
    row = {
        "train_seconds": round(seconds, 1),
        "single": [accuracy for accuracy, _ in single],
        "single_tta": [score([m], test_csv, folder, True) for m in members],
        "ece": [ece for _, ece in single],
    }
    if args.ensemble > 1:
        row["ensemble"] = score(members, test_csv, folder, False)
        accuracy, ece = scored_with_calibration(members, test_csv, folder / "report", True)
        row["ensemble_tta"], row["ensemble_tta_ece"] = accuracy, ece
    return row


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f}% +- {100 * sd:.2f}"


def summarize(rows: list[dict], ensemble: int) -> dict[str, str]:
    summary = {
        "single model": mean_sd([a for r in rows for a in r["single"]]),
        "single model, --tta": mean_sd([a for r in rows for a in r["single_tta"]]),
        "ECE before calibration": mean_sd([e["before"] for r in rows for e in r["ece"]]),
        "ECE after calibration": mean_sd([e["after"] for r in rows for e in r["ece"]]),
    }
    if ensemble > 1:
        summary[f"ensemble of {ensemble}"] = mean_sd([r["ensemble"] for r in rows])
        summary[f"ensemble of {ensemble}, --tta"] = mean_sd([r["ensemble_tta"] for r in rows])
        for when in ("before", "after"):
            ece = [r["ensemble_tta_ece"][when] for r in rows]
            summary[f"ensemble, --tta, ECE {when} calibration"] = mean_sd(ece)
    return summary


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=f"--arch also takes the study's architectures: {', '.join(STUDY)}",
    )
    p.add_argument("--protocol", choices=("writers", "folds"), default="writers")
    p.add_argument("--folds", type=int, default=5, help="with --protocol folds")
    p.add_argument("--ensemble", type=int, default=1)
    p.add_argument("--out", type=Path, help="write every figure as JSON here")
    p.add_argument("flags", nargs="*", help="train.py flags, after --")
    args = p.parse_args()
    data = dataset.load_csv(REAL_DIGITS)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, (name, test_rows) in enumerate(
            test_sets(data.labels, args.protocol, args.folds).items()
        ):
            rows.append(
                {"split": name, **run_split(data, test_rows, Path(tmp) / f"split{k}", args)}
            )
            print(json.dumps(rows[-1]), flush=True)
    how = (
        "writer-disjoint halves, both ways"
        if args.protocol == "writers"
        else f"{args.folds}-fold CV"
    )
    seconds = statistics.mean(r["train_seconds"] for r in rows)
    print(
        f"\n{how} on {len(data):,} real digits ({REAL_DIGITS.name}); train.py "
        f"{' '.join(args.flags) or '(default recipe)'}; {machine()}; mean train time per split "
        f"{seconds:.0f} s" + (f" for {args.ensemble} models" if args.ensemble > 1 else "")
    )
    summary = summarize(rows, args.ensemble)
    for label, value in summary.items():
        print(f"{label:28} {value}")
    if args.out:
        record = {"protocol": args.protocol, "flags": args.flags, "splits": rows, **summary}
        args.out.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
