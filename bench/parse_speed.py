"""CSV parse and parse-cache speed, side by side with pandas.read_csv on the same file in one run.

usage: python bench/parse_speed.py [CSV_GZ] [--repeats N]
The CSV (default ../shared/data/fashion-mnist_train.csv.gz, 60,000 rows) is decompressed once to a
temporary .csv, so that every contender reads the same plain file from the page cache.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import statistics
import tempfile
from pathlib import Path

from common import SHARED, machine, timed

DEFAULT = SHARED / "data" / "fashion-mnist_train.csv.gz"


def main() -> None:
    import dataset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv_gz", nargs="?", type=Path, default=DEFAULT)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import pandas as pd

    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / args.csv_gz.name.removesuffix(".gz")
        with gzip.open(args.csv_gz) as src, open(csv, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.environ["MNIST_CACHE_DIR"] = str(Path(tmp) / "cache")
        size_mb = csv.stat().st_size / 1e6
        pandas_s, parse_s, first_load_s, cached_s = [], [], [], []
        for _ in range(args.repeats):  # interleaved, so that machine drift hits both alike
            pandas_s.append(timed(lambda: pd.read_csv(csv))[0])
            parse_s.append(timed(lambda: dataset.read_csv(csv))[0])
            shutil.rmtree(os.environ["MNIST_CACHE_DIR"], ignore_errors=True)
            first_load_s.append(timed(lambda: dataset.load_csv(csv))[0])
            cached_s.append(timed(lambda: dataset.load_csv(csv))[0])
        rows = len(dataset.load_csv(csv))
    med = statistics.median
    print(f"machine: {machine()}")
    print(
        f"file: {args.csv_gz.name} decompressed, {rows:,} rows, {size_mb:.0f} MB; "
        f"median of {args.repeats}"
    )
    print(f"{'contender':44} {'seconds':>8} {'vs pandas':>10}")
    for name, runs in (
        ("pandas.read_csv (default arguments)", pandas_s),
        ("dataset.read_csv (parse + validation)", parse_s),
        ("dataset.load_csv, empty cache (+ cache write)", first_load_s),
        ("dataset.load_csv, from the parse cache", cached_s),
    ):
        print(f"{name:44} {med(runs):8.3f} {med(pandas_s) / med(runs):9.1f}x")


if __name__ == "__main__":
    main()
