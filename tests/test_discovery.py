"""Finding the data, the Kaggle download at the client's boundary, and the exploration command."""

from __future__ import annotations

import gzip
import io
import zipfile
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from conftest import csv_text, make_table

import config
import dataset
import predict
import train
from cli import UserError, run_cli, working_root

HEADER = dataset.LAYOUTS["mnist-in-csv"][0]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """An empty data/ directory with the real bundled sample beside it."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    monkeypatch.setattr(dataset, "DATA_DIR", data_dir)
    return data_dir


def test_the_bundled_sample_is_used_last(project):
    assert Path(dataset.find_data("train")) == dataset.SAMPLE_DIR / "mnist_train.csv.gz"
    assert Path(dataset.find_data("test")) == dataset.SAMPLE_DIR / "mnist_test.csv.gz"


def test_using_the_bundled_sample_says_so_in_one_line(project, capsys):
    dataset.find_data("train")
    (note,) = capsys.readouterr().err.splitlines()
    assert "bundled sample" in note
    assert "dataset.py download" in note


@pytest.mark.parametrize(("split", "rows"), [("train", 4000), ("test", 1000)])
def test_the_bundled_sample_holds_every_class(split, rows):
    sample = dataset.load_csv(dataset.SAMPLE_DIR / f"mnist_{split}.csv.gz")
    assert len(sample) == rows
    assert set(np.unique(sample.labels)) == set(range(10))


def test_without_data_or_sample_the_error_says_what_to_attach(project, tmp_path, monkeypatch):
    monkeypatch.setattr(dataset, "SAMPLE_DIR", tmp_path / "no-sample")  # as in a Kaggle kernel
    with pytest.raises(UserError, match="attach the dataset oddrationale/mnist-in-csv"):
        dataset.find_data("train")


def test_outside_a_kernel_commands_write_here():
    assert working_root() == Path()


def test_inside_a_kernel_commands_write_to_kaggle_working(monkeypatch):
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    assert working_root() == Path("/kaggle/working")


def test_kaggle_working_root_moves_every_default_output(monkeypatch):
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    monkeypatch.setenv("KAGGLE_WORKING_ROOT", "/elsewhere")
    options = predict.parse_args([])
    outputs = {
        "models": config.Config(**config.parse_args([])).model_dir,
        "checkpoint": options.checkpoint,
        "submission": options.output,
        "report": options.report_dir,
    }
    assert outputs == {
        "models": "/elsewhere/models",
        "checkpoint": ["/elsewhere/models/best.pt"],
        "submission": "/elsewhere/submissions/submission.csv",
        "report": "/elsewhere/outputs/report",
    }


def write_digit_recognizer(folder: Path, train_rows: int = 60, test_rows: int = 37) -> None:
    """Digit Recognizer's pair as Kaggle serves it: train.csv labelled, test.csv not."""
    for name, table, layout in (
        ("train.csv", make_table(train_rows, seed=3), "digit-recognizer"),
        ("test.csv", make_table(test_rows, labelled=False, seed=4), "digit-recognizer-test"),
    ):
        (folder / name).write_text(csv_text(table, dataset.LAYOUTS[layout][0]))


def test_digit_recognizers_train_and_test_csv_in_data_dir_are_found(project, capsys):
    write_digit_recognizer(project)
    found = (dataset.find_data("train"), dataset.find_data("test"))
    assert found == (str(project / "train.csv"), str(project / "test.csv"))
    assert capsys.readouterr().err == ""


def test_mnist_in_csv_beats_digit_recognizer_in_data_dir(project):
    write_digit_recognizer(project)
    (project / "mnist_train.csv.gz").write_bytes(
        gzip.compress(csv_text(make_table(3), HEADER).encode())
    )
    assert dataset.find_data("train") == str(project / "mnist_train.csv.gz")
    assert dataset.find_data("test") == str(project / "test.csv")


def test_plain_train_and_predict_make_a_digit_recognizer_submission(project, tmp_path):
    """`python train.py && python predict.py` with only Kaggle's competition files in data/:
    one row a test.csv row, ImageId 1..N in order, a digit for each."""
    write_digit_recognizer(project)
    out = tmp_path / "run"
    flags = ["--arch", "basic", "--epochs", "1", "--no-plots", "--quiet", "--device", "cpu"]
    summary = train.main([*flags, "--model-dir", str(out), "--out-dir", str(out)])
    assert summary["train_source"] == str(project / "train.csv")
    assert "test_acc" not in summary  # Digit Recognizer's test.csv has no labels to score
    submission = tmp_path / "submission.csv"
    where = ["--checkpoint", str(out / "best.pt"), "--output", str(submission), "--no-report"]
    predict.main([*where, "--device", "cpu"])
    lines = submission.read_text().splitlines()
    assert lines[0] == "ImageId,Label"
    ids, labels = zip(*(line.split(",") for line in lines[1:]), strict=True)
    assert [int(i) for i in ids] == list(range(1, 38))
    assert set(labels) <= set("0123456789")


def test_data_dir_csvs_beat_the_sample_silently(project, capsys):
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


class FakeCompetitionApi:
    """Stands in for kaggle.api: leaves digit-recognizer.zip as Kaggle serves a competition."""

    def __init__(self):
        self.calls = []

    def competition_download_files(self, competition, path, quiet):
        self.calls.append(competition)
        with zipfile.ZipFile(Path(path) / f"{competition}.zip", "w") as zf:
            for name, labelled, layout in (
                ("train.csv", True, "digit-recognizer"),
                ("test.csv", False, "digit-recognizer-test"),
            ):
                table = make_table(20, labelled=labelled)
                zf.writestr(name, csv_text(table, dataset.LAYOUTS[layout][0]))
            zf.writestr("sample_submission.csv", "ImageId,Label\n1,0\n")


@pytest.mark.parametrize(
    ("unzip", "found"), [(True, "{}.csv"), (False, "digit-recognizer.zip::{}.csv")]
)
def test_the_competitions_download_is_found_by_plain_commands(project, unzip, found):
    api = FakeCompetitionApi()
    written = dataset.download(project, unzip=unzip, api=api, competition="digit-recognizer")
    assert api.calls == ["digit-recognizer"]
    assert [p.name for p in written] == (
        ["test.csv", "train.csv"] if unzip else ["digit-recognizer.zip"]
    )
    for split in ("train", "test"):
        assert dataset.find_data(split) == str(project / found.format(split))
    assert len(dataset.load_csv(dataset.find_data("test"))) == 20


@pytest.mark.parametrize("unzip", [True, False])
def test_download_asks_kaggle_for_oddrationale_mnist_in_csv(project, unzip):
    api = FakeKaggleApi()
    dataset.download(project, unzip=unzip, api=api)
    assert api.calls == [("oddrationale/mnist-in-csv", unzip)]


@pytest.mark.parametrize(
    ("unzip", "found"),
    [(True, "mnist_{}.csv"), (False, "mnist-in-csv.zip::mnist_{}.csv")],
)
def test_discovery_finds_what_the_download_wrote(project, unzip, found):
    dataset.download(project, unzip=unzip, api=FakeKaggleApi())
    rows = {}
    for split in ("train", "test"):
        path = dataset.find_data(split)
        assert path == str(project / found.format(split))
        rows[split] = len(dataset.load_csv(path))
    assert rows == {"train": 30, "test": 10}


def test_download_failure_names_the_manual_command(project):
    api = FakeKaggleApi(fail=ConnectionError("Name or service not known"))
    with pytest.raises(UserError, match=r"Name or service not known.*--unzip"):
        dataset.download(project, api=api)


def test_missing_credentials_exit_2_with_the_manual_command(project, tmp_path, monkeypatch, capsys):
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(dataset.main, ["download", "--dest", str(project)])
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    (line,) = err.splitlines()
    assert line.startswith("error: kaggle: no usable Kaggle credentials")
    assert f"kaggle datasets download -d oddrationale/mnist-in-csv -p {project} --unzip" in line
    assert out == ""


@pytest.fixture(scope="module")
def explored(tmp_path_factory):
    """`explore` on the bundled sample's test CSV: its summary, what it printed, its folder."""
    out_dir = tmp_path_factory.mktemp("explore")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MNIST_CACHE_DIR", str(out_dir / "cache"))
        printed = io.StringIO()
        with redirect_stdout(printed):
            summary = dataset.explore(str(dataset.SAMPLE_DIR / "mnist_test.csv.gz"), out_dir)
    return summary, printed.getvalue(), out_dir


def test_explore_counts_rows_and_classes(explored):
    summary, printed, _ = explored
    assert summary["rows"] == 1000
    assert sum(summary["class_counts"]) == 1000
    assert "1,000 rows" in printed


def test_explore_measures_the_pixels_of_real_digits(explored):
    summary, _, _ = explored
    assert 0.1 < summary["pixel_mean"] < 0.16  # MNIST's: 0.1307
    assert 0.28 < summary["pixel_std"] < 0.34  # MNIST's: 0.3081


@pytest.mark.parametrize(
    "figure", ["sample_images.png", "class_distribution.png", "augmented_digits.png"]
)
def test_explore_draws_its_figures(explored, figure):
    _, _, out_dir = explored
    assert (out_dir / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
