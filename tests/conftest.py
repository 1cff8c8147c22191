"""What the tests share: the bundled sample's paths, the flags of a short training run, one
model trained on the sample, and small CSVs in Kaggle's layouts written into tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import dataset

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SAMPLE_TRAIN = str(dataset.SAMPLE_DIR / "mnist_train.csv.gz")
SAMPLE_TEST = str(dataset.SAMPLE_DIR / "mnist_test.csv.gz")


def run_flags(folder: Path, *extra: str) -> list[str]:
    """train.py flags for a short run on the CPU writing under `folder` (models/, out/), with
    no figures and no progress, then `extra`."""
    where = ["--model-dir", str(folder / "models"), "--out-dir", str(folder / "out")]
    return ["--device", "cpu", "--no-plots", "--quiet", *where, *extra]


@pytest.fixture(scope="session")
def sample_model(tmp_path_factory) -> str:
    """best.pt of `basic` trained 4 epochs on the sample (seed 0, deterministic): the model
    the tests that predict, export or serve share."""
    import train

    folder = tmp_path_factory.mktemp("sample-model")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MNIST_CACHE_DIR", str(folder / "cache"))
        flags = ["--train", SAMPLE_TRAIN, "--arch", "basic", "--epochs", "4", "--deterministic"]
        train.main(run_flags(folder, *flags))
    return str(folder / "models" / "best.pt")


def make_table(n: int, labelled: bool = True, seed: int = 0) -> np.ndarray:
    """n random rows: a label 0..9 (when labelled) then 784 pixels, mostly 0 as in MNIST."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(n, 784)) * (rng.random((n, 784)) < 0.2)
    if not labelled:
        return pixels
    return np.column_stack([rng.integers(0, 10, size=n), pixels])


def csv_text(table: np.ndarray, header: tuple[str, ...] | None) -> str:
    lines = [] if header is None else [",".join(header)]
    lines += [",".join(map(str, row)) for row in table]
    return "\n".join(lines) + "\n"


@pytest.fixture(autouse=True, scope="session")
def session_cache(tmp_path_factory):
    """Module and session fixtures parse into a cache of the test run, never the project's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MNIST_CACHE_DIR", str(tmp_path_factory.mktemp("session-cache")))
        yield


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own parse cache, no Kaggle input directory and no kernel settings."""
    monkeypatch.setenv("MNIST_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("KAGGLE_INPUT_ROOT", str(tmp_path_factory.mktemp("no-kaggle") / "input"))
    monkeypatch.delenv("KAGGLE_WORKING_ROOT", raising=False)
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)


@pytest.fixture
def write_csv(tmp_path):
    """write_csv(name, table, layout='mnist-in-csv' | None for headerless) -> Path."""

    def write(name: str, table: np.ndarray, layout: str | None = "mnist-in-csv") -> Path:
        header = None if layout is None else dataset.LAYOUTS[layout][0]
        path = tmp_path / name
        path.write_text(csv_text(table, header))
        return path

    return write
