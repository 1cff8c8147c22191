"""Finding the data, the Kaggle download at the client's boundary, and the exploration command."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import csv_text, make_table

import dataset

HEADER = dataset.LAYOUTS["mnist-in-csv"][0]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """An empty data/ directory with the real bundled sample beside it."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    monkeypatch.setattr(dataset, "DATA_DIR", data_dir)
    return data_dir


def test_the_bundled_sample_is_used_last_and_says_so(project, capsys):
    found = dataset.find_data("train")
    assert Path(found) == dataset.SAMPLE_DIR / "mnist_train.csv.gz"
    note = capsys.readouterr().err
    assert note.count("\n") == 1 and "bundled sample" in note and "dataset.py download" in note
    sample = dataset.load_csv(found)
    assert len(sample) == 4000 and set(np.unique(sample.labels)) == set(range(10))
    assert len(dataset.load_csv(dataset.find_data("test"))) == 1000


def test_without_data_or_sample_the_error_says_what_to_attach(project, tmp_path, monkeypatch):
    monkeypatch.setattr(dataset, "SAMPLE_DIR", tmp_path / "no-sample")  # as in a Kaggle kernel
    with pytest.raises(dataset.UserError, match="attach the dataset oddrationale/mnist-in-csv"):
        dataset.find_data("train")


def test_working_root_is_kaggles_inside_a_kernel(monkeypatch):
    assert dataset.working_root() == Path()
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    assert dataset.working_root() == Path("/kaggle/working")
    monkeypatch.setenv("KAGGLE_WORKING_ROOT", "/elsewhere")
    assert dataset.working_root() == Path("/elsewhere")
    import predict
    import train

    assert train.parse_args([])["model_dir"] == "/elsewhere/models"
    args = predict.parse_args([])
    assert args["checkpoint"] == ["/elsewhere/models/best.pt"]
    assert args["output"] == "/elsewhere/submissions/submission.csv"
    assert args["report_dir"] == "/elsewhere/outputs/report"


def test_data_dir_csvs_beat_the_sample(project, capsys):
    (project / "mnist_test.csv").write_text(csv_text(make_table(3), HEADER))
    assert dataset.find_data("test") == str(project / "mnist_test.csv")
    assert capsys.readouterr().err == ""


KAGGLE_MOUNTS = {  # where Kaggle puts attached data, and the files it holds there
    "dataset": ("datasets/oddrationale/mnist-in-csv", ("mnist_train.csv", "mnist_test.csv")),
    "competition": ("competitions/digit-recognizer", ("train.csv", "test.csv")),
    "older kernels": ("mnist-in-csv", ("mnist_train.csv", "mnist_test.csv")),
}


def mount(root: Path, layout: str) -> tuple[Path, Path]:
    """Kaggle's input folder with `layout` attached; the train and test CSVs."""
    folder, names = KAGGLE_MOUNTS[layout]
    paths = []
    for name in names:
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / name).write_text(csv_text(make_table(4), HEADER))
        paths.append(root / folder / name)
    (root / folder / "sample_submission.csv").write_text("ImageId,Label\n1,0\n")
    return paths[0], paths[1]


@pytest.mark.parametrize("layout", KAGGLE_MOUNTS)
def test_every_kaggle_input_layout_is_found_before_data_dir(project, tmp_path, monkeypatch, layout):
    (project / "mnist_train.csv").write_text(csv_text(make_table(3), HEADER))
    root = tmp_path / "kaggle" / "input"
    train, test = mount(root, layout)
    monkeypatch.setenv("KAGGLE_INPUT_ROOT", str(root))
    assert (dataset.find_data("train"), dataset.find_data("test")) == (str(train), str(test))


def test_with_a_dataset_and_the_competition_attached_mnist_in_csv_wins(tmp_path, monkeypatch):
    root = tmp_path / "kaggle" / "input"
    mount(root, "competition")
    train, test = mount(root, "dataset")
    monkeypatch.setenv("KAGGLE_INPUT_ROOT", str(root))
    assert (dataset.find_data("train"), dataset.find_data("test")) == (str(train), str(test))


class FakeKaggleApi:
    """Stands in for kaggle.api: writes the zip that Kaggle serves for oddrationale/mnist-in-csv."""

    def __init__(self, fail: Exception | None = None):
        self.fail, self.calls = fail, []

    def dataset_download_files(self, dataset_ref, path, unzip, quiet):
        self.calls.append((dataset_ref, unzip))
        if self.fail:
            raise self.fail
        archive = Path(path) / "mnist-in-csv.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("mnist_train.csv", csv_text(make_table(30, seed=1), HEADER))
            zf.writestr("mnist_test.csv", csv_text(make_table(10, seed=2), HEADER))
        if unzip:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(path)
            archive.unlink()


@pytest.mark.parametrize("unzip", [True, False])
def test_download_then_discovery_finds_the_files(project, unzip, capsys):
    api = FakeKaggleApi()
    dataset.download(project, unzip=unzip, api=api)
    assert api.calls == [("oddrationale/mnist-in-csv", unzip)]
    train, test = dataset.find_data("train"), dataset.find_data("test")
    assert "bundled sample" not in capsys.readouterr().err
    assert len(dataset.load_csv(train)) == 30 and len(dataset.load_csv(test)) == 10
    assert train.endswith("mnist_train.csv") and ("::" in train) == (not unzip)


def test_download_failure_names_the_manual_command(project):
    api = FakeKaggleApi(fail=ConnectionError("Name or service not known"))
    with pytest.raises(dataset.UserError, match=r"Name or service not known.*--unzip"):
        dataset.download(project, api=api)


def test_missing_credentials_exit_2_with_the_manual_command(project, tmp_path, monkeypatch, capsys):
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        dataset.run_cli(dataset.main, ["download", "--dest", str(project)])
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: kaggle: no usable Kaggle credentials") and err.count("\n") == 1
    assert "kaggle datasets download -d oddrationale/mnist-in-csv -p data --unzip" in err
    assert out == ""


def test_explore_prints_statistics_and_writes_figures(tmp_path, capsys):
    sample = dataset.SAMPLE_DIR / "mnist_test.csv.gz"
    summary = dataset.explore(str(sample), tmp_path / "out")
    out = capsys.readouterr().out
    assert summary["rows"] == 1000 and sum(summary["class_counts"]) == 1000
    assert 0.1 < summary["pixel_mean"] < 0.16 and 0.28 < summary["pixel_std"] < 0.34
    assert "1,000 rows" in out and "share" in out
    for name in ("sample_images.png", "class_distribution.png", "augmented_digits.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
