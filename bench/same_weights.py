"""Prove that a change kept training and prediction as they were: run the same short trainings and
predictions with this working tree and with another commit (checked out into a temporary git
worktree), on the bundled sample, and compare the weights tensor for tensor, the histories, the
files written and the submissions.

    python bench/same_weights.py e88383a          # this tree against commit e88383a
    python bench/same_weights.py HEAD~3 --keep    # keep the outputs for a look

Both trees run under this interpreter, on the CPU with deterministic algorithms, in the precision
$MNIST_PRECISION gives (default: auto). Exit 0 when everything is identical, 1 otherwise.
"""

from __future__ import annotations

import argparse
import csv
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
RUNS = {  # name: train.py flags; every run predicts the sample's test CSV after training
    "default": "--epochs 2 --max-rows 1200 --seed 3",
    "fast": "--preset fast --epochs 2 --max-rows 1200",
    "sgd": "--arch basic --optimizer sgd --scheduler step --no-augment --epochs 3 --max-rows 800",
}


def run(tree: Path, out: Path, flags: str) -> None:
    """Train and predict with the code in `tree`, writing under `out`."""
    data = [
        "--train",
        str(SAMPLE / "mnist_train.csv.gz"),
        "--test",
        str(SAMPLE / "mnist_test.csv.gz"),
    ]
    dirs = ["--model-dir", str(out / "models"), "--out-dir", str(out / "outputs")]
    train = [
        str(tree / "train.py"),
        *data,
        *dirs,
        "--quiet",
        "--deterministic",
        *shlex.split(flags),
    ]
    predict = [str(tree / "predict.py"), "--checkpoint", str(out / "models" / "best.pt")]
    predict += [
        "--input",
        str(SAMPLE / "mnist_test.csv.gz"),
        "--output",
        str(out / "submission.csv"),
    ]
    predict += ["--report-dir", str(out / "report"), "--probabilities"]
    for command in (train, predict):
        subprocess.run(
            [sys.executable, *command, "--device", "cpu"], check=True, capture_output=True
        )


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def timeless(rows: list[list[str]]) -> list[list[str]]:
    """A history without its clock columns (seconds, images/s), which differ between runs."""
    keep = [i for i, name in enumerate(rows[0]) if name not in ("seconds", "images_per_s")]
    return [[row[i] for i in keep] for row in rows]


def differences(a: Path, b: Path) -> list[str]:
    """What differs between two runs' outputs (nothing, for a refactor)."""
    found = []
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    if files_a != files_b:
        found.append(f"files written: {sorted(set(files_a) ^ set(files_b))}")
    for name in ("best.pt", "last.pt"):
        ckpt_a, ckpt_b = (torch.load(d / "models" / name, weights_only=True) for d in (a, b))
        weights_a, weights_b = ckpt_a["state_dict"], ckpt_b["state_dict"]
        if weights_a.keys() != weights_b.keys():
            found.append(f"{name}: different tensors")
        else:
            found += [
                f"{name}: {k} differs"
                for k in weights_a
                if not torch.equal(weights_a[k], weights_b[k])
            ]
        if ckpt_a["epoch"] != ckpt_b["epoch"]:
            found.append(f"{name}: epoch {ckpt_a['epoch']} against {ckpt_b['epoch']}")
    history_a, history_b = (timeless(read_csv(d / "outputs" / "history.csv")) for d in (a, b))
    if history_a != history_b:
        found.append("history.csv differs")
    if read_csv(a / "submission.csv") != read_csv(b / "submission.csv"):
        found.append("submission.csv differs")
    return found


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("commit", help="the commit to compare this working tree against")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="same-weights-"))
    reference = work / "reference"
    git = ["git", "-C", str(ROOT), "worktree"]
    subprocess.run([*git, "add", "--detach", str(reference), args.commit], check=True)
    try:
        failed = False
        for name, flags in RUNS.items():
            for tree, label in ((reference, "reference"), (ROOT, "this")):
                run(tree, work / name / label, flags)
            found = differences(work / name / "reference", work / name / "this")
            weights = torch.load(work / name / "this" / "models" / "last.pt", weights_only=True)
            same = f"identical: {len(weights['state_dict'])} tensors, history, files, submission"
            print(f"{name}: {'; '.join(found) or same}")
            failed |= bool(found)
        return int(failed)
    finally:
        subprocess.run([*git, "remove", "--force", str(reference)], check=False)
        if args.keep:
            print(f"outputs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
