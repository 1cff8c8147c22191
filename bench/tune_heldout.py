"""Does tune.py's best recipe beat the default on writers the search never saw?

The search runs on the 5,000 real digits of NIST SD-1 (rows 0-4,999 of the MNIST test file) and
decides on its validation split alone; then the default recipe and the search's best train on
SD-1 with several seeds, and both are scored on the 5,000 digits of SD-3 (rows 5,000-9,999),
whose writers neither the search nor the training saw.

usage: python bench/tune_heldout.py [--trials 20] [--tune-json tune.json] [--seeds 3]
                                    [--out results.json]
Data: ../shared/data/mnist_test.csv.gz (real digits, Kaggle's "MNIST in CSV" layout).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from common import SHARED, machine, timed
from cv_digits import write_csv

import dataset
import train
import tune

REAL_DIGITS = SHARED / "data" / "mnist_test.csv.gz"


def score(given: dict, train_csv: Path, test_csv: Path, seed: int, folder: Path) -> float:
    """Accuracy on `test_csv` of the recipe `given` trained on `train_csv` with `seed`."""
    where = {"model_dir": str(folder / "models"), "out_dir": str(folder / "out")}
    run = {"train": str(train_csv), "test": str(test_csv), "seed": seed, "no_plots": True}
    return train.train({**given, **run, **where, "quiet": True})["test_acc"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=20, help="the search's trials")
    p.add_argument("--tune-json", type=Path, help="a finished search's tune.json to use instead")
    p.add_argument("--seeds", type=int, default=3, help="seeds each recipe trains with")
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = p.parse_args()
    print(machine())
    digits = dataset.load_csv(str(REAL_DIGITS))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sd3, sd1 = tmp / "sd3.csv", tmp / "sd1.csv"
        write_csv(sd3, digits.images[:5000], digits.labels[:5000])
        write_csv(sd1, digits.images[5000:], digits.labels[5000:])
        if args.tune_json:
            searched = json.loads(args.tune_json.read_text())
            search_seconds = None
        else:
            search = ["--train", str(sd3), "--trials", str(args.trials), "--sampler-seed", "0"]
            search_seconds, searched = timed(
                lambda: tune.main([*search, "--out-dir", str(tmp / "tune")])
            )
        recipes = {"default": {}}
        best = searched["best"]["params"]
        if best == tune.default_params("digits", tune.TuneConfig().max_epochs):
            print("the search's best trial is the default recipe")
        else:
            recipes[f"best (trial {searched['best']['trial']})"] = tune.recipe_flags(best)
        results = {}
        for name, given in recipes.items():
            accs = [
                score(given, sd3, sd1, seed, tmp / name.split()[0] / str(seed))
                for seed in range(args.seeds)
            ]
            results[name] = {"flags": given, "test_acc": accs}
            print(
                f"{name:>18}: SD-1 -> SD-3 {statistics.mean(accs):.2%} "
                f"(seeds {', '.join(f'{a:.2%}' for a in accs)})"
            )
    figures = {"machine": machine(), "search": searched, "search_seconds": search_seconds}
    figures["results"] = results
    if args.out:
        args.out.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
