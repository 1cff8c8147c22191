"""CSV parse and parse-cache speed, side by side with the libraries' readers in one run.

usage: python bench/parse_speed.py [CSV_GZ] [--repeats N]
The CSV (default ../shared/data/mnist_train.csv.gz, 54,113 MNIST rows, 99 MB as plain text) is
decompressed once to a temporary .csv, so that every contender reads the same plain file from the
page cache, as Kaggle leaves `mnist_train.csv`. The contenders: pandas.read_csv with its default
engine and with engine="pyarrow" (multi-threaded), polars.read_csv (each skipped when its package
is absent; pyarrow and polars are not requirements), and the project's own reader, which also
validates every cell.
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

DEFAULT = SHARED / "data" / "mnist_train.csv.gz"


def library_readers() -> dict:
    """The libraries' CSV readers installed here, by name."""
    import pandas as pd

    readers = {"pandas.read_csv (default engine)": pd.read_csv}
    try:
        import pyarrow  # noqa: F401

        readers['pandas.read_csv(engine="pyarrow")'] = lambda f: pd.read_csv(f, engine="pyarrow")
    except ImportError:
        pass
    try:
        import polars

        readers["polars.read_csv"] = polars.read_csv
    except ImportError:
        pass
    return readers


def main() -> None:
    import dataset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv_gz", nargs="?", type=Path, default=DEFAULT)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    readers = library_readers()
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / args.csv_gz.name.removesuffix(".gz")
        with gzip.open(args.csv_gz) as src, open(csv, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.environ["MNIST_CACHE_DIR"] = str(Path(tmp) / "cache")
        size_mb = csv.stat().st_size / 1e6
        library_s = {name: [] for name in readers}
        parse_s, first_load_s, cached_s = [], [], []
        for _ in range(args.repeats):  # interleaved, so that machine drift hits all alike
            for name, read in readers.items():
                library_s[name].append(timed(lambda read=read: read(csv))[0])
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
    fastest = min(med(runs) for runs in library_s.values())
    print(f"{'contender':46} {'seconds':>8} {'fastest library / it':>21}")
    for name, runs in (
        *library_s.items(),
        ("dataset.read_csv (parse + validation)", parse_s),
        ("dataset.load_csv, empty cache (+ cache write)", first_load_s),
        ("dataset.load_csv, from the parse cache", cached_s),
    ):
        print(f"{name:46} {med(runs):8.3f} {fastest / med(runs):20.2f}x")
    print(
        f"the project's parse takes {med(parse_s) / fastest:.2f}x the fastest library's time "
        "(it stays while that is at most 1.5x)"
    )


if __name__ == "__main__":
    main()
