"""Kaggle: the notebook kernel runs the pipeline like Kaggle would, is up to date with the modules,
its metadata passes the kaggle client's push checks, the Digit Recognizer flow gives a valid
submission, and no credential leaks into anything written."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import json
import subprocess
import sys
from contextlib import nullcontext, redirect_stdout
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import ROOT, csv_text

import dataset
import model as models

KAGGLE_DIR = ROOT / "kaggle"
SECRET_USER, SECRET_KEY = "sentinel-user-7f3a", "sentinel-key-0c9e41d2b6"


def load_builder():
    spec = importlib.util.spec_from_file_location(
        "build_notebook", KAGGLE_DIR / "build_notebook.py"
    )
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    return builder


def test_the_committed_notebook_is_built_from_the_current_modules():
    builder = load_builder()
    assert builder.render(builder.build()) == builder.NOTEBOOK.read_text(), (
        "kaggle/mnist-csv-pipeline.ipynb is out of date: run python kaggle/build_notebook.py"
    )
    sources = "".join("".join(c["source"]) for c in builder.build()["cells"])
    for name in builder.MODULES:
        assert (ROOT / name).read_text() in sources, name


def test_kernel_metadata_passes_the_kaggle_clients_push_checks(monkeypatch):
    from kaggle.api.kaggle_api_extended import KaggleApi

    sent = []
    client = SimpleNamespace(kernels=SimpleNamespace(kernels_api_client=SimpleNamespace(
        save_kernel=lambda request: sent.append(request) or "saved"
    )))  # fmt: skip
    api = KaggleApi()
    monkeypatch.setattr(api, "build_kaggle_client", lambda: nullcontext(client))
    chatter = io.StringIO()
    with redirect_stdout(chatter):
        assert api.kernels_push(str(KAGGLE_DIR)) == "saved"
    assert "does not resolve" not in chatter.getvalue()  # the title matches the id's slug
    (request,) = sent
    assert request.kernel_type == "notebook" and request.language == "python"
    assert request.enable_gpu and request.dataset_data_sources == ["oddrationale/mnist-in-csv"]
    assert request.slug.endswith("/mnist-csv-pipeline")
    notebook = json.loads(request.text)  # what Kaggle receives: the notebook, code and all
    assert "%%writefile {PROJECT}/dataset.py" in "".join(c["source"] for c in notebook["cells"])


@pytest.fixture
def kaggle_roots(tmp_path, monkeypatch):
    """The bundled sample laid out as Kaggle mounts oddrationale/mnist-in-csv, an empty working
    directory, and credentials in the environment that must never be written anywhere."""
    mount = tmp_path / "kaggle" / "input" / "mnist-in-csv"
    mount.mkdir(parents=True)
    for split in ("train", "test"):
        with gzip.open(dataset.SAMPLE_DIR / f"mnist_{split}.csv.gz") as f:
            (mount / f"mnist_{split}.csv").write_bytes(f.read())
    working = tmp_path / "kaggle" / "working"
    working.mkdir()
    monkeypatch.setenv("KAGGLE_INPUT_ROOT", str(tmp_path / "kaggle" / "input"))
    monkeypatch.setenv("KAGGLE_WORKING_ROOT", str(working))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # where the notebook writes the code
    monkeypatch.setenv("KAGGLE_USERNAME", SECRET_USER)
    monkeypatch.setenv("KAGGLE_KEY", SECRET_KEY)
    return working


def assert_no_secret_in(paths) -> None:
    for path in paths:
        data = path.read_bytes()
        assert SECRET_KEY.encode() not in data and SECRET_USER.encode() not in data, path


def test_the_notebook_runs_the_whole_pipeline_like_a_kaggle_kernel(kaggle_roots):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(KAGGLE_DIR / "mnist-csv-pipeline.ipynb", as_version=4)
    (parameters,) = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    parameters.source = 'TRAIN_ARGS = ["--epochs", "2", "--arch", "basic"]'  # quick, for CI
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(kaggle_roots)}}).execute()  # fmt: skip
    working = kaggle_roots
    assert models.load_checkpoint(working / "models" / "best.pt")["arch"] == "basic"
    with open(working / "submissions" / "submission.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["ImageId", "Label"] and len(rows) == 1001
    assert [int(r[0]) for r in rows[1:]] == list(range(1, 1001))
    assert {r[1] for r in rows[1:]} <= set("0123456789")
    for figure in ("sample_images", "class_distribution", "training_curves",
                   "report/confusion_matrix", "report/sample_predictions"):  # fmt: skip
        assert (working / "outputs" / f"{figure}.png").read_bytes()[:4] == b"\x89PNG", figure
    assert (working / "outputs" / "report" / "report.html").is_file()
    shown = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs
             if "image/png" in o.get("data", {})]  # fmt: skip
    assert len(shown) >= 8  # 3 exploration, the curves, 4 report figures, inline
    text = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code"
                   for o in c.outputs)  # fmt: skip
    assert "epoch   2/2" in text and "accuracy" in text
    assert not any(p.suffix == ".py" for p in working.rglob("*"))  # the code stays out of outputs
    (code_dir,) = (working.parent.parent / "tmp").glob("mnist-csv-pipeline-*")
    assert {p.name for p in code_dir.glob("*.py")} == set(load_builder().MODULES)
    assert_no_secret_in([p for p in working.rglob("*") if p.is_file()])
    assert SECRET_KEY not in nbformat.writes(notebook) and SECRET_USER not in nbformat.writes(
        notebook
    )


def test_digit_recognizer_competition_flow(tmp_path):
    """`python train.py --train data/train.csv` then `python predict.py --input data/test.csv`
    with Kaggle's Digit Recognizer formats, cut from the bundled sample."""
    train_rows = dataset.load_csv(dataset.SAMPLE_DIR / "mnist_train.csv.gz")
    test_rows = dataset.load_csv(dataset.SAMPLE_DIR / "mnist_test.csv.gz")
    (tmp_path / "data").mkdir()
    table = np.column_stack([train_rows.labels[:2000], train_rows.images[:2000].reshape(-1, 784)])
    train_csv = csv_text(table, dataset.LAYOUTS["digit-recognizer"][0])
    (tmp_path / "data" / "train.csv").write_text(train_csv)
    hidden = test_rows.labels[:300]
    test_csv = csv_text(
        test_rows.images[:300].reshape(-1, 784), dataset.LAYOUTS["digit-recognizer-test"][0]
    )
    (tmp_path / "data" / "test.csv").write_text(test_csv)
    assert train_csv.startswith("label,pixel0,pixel1,") and test_csv.startswith("pixel0,pixel1,")

    def run(script: str, *args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(ROOT / script), *args]
        return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, check=True)

    run("train.py", "--train", "data/train.csv", "--epochs", "3", "--arch", "basic", "--quiet")
    done = run("predict.py", "--input", "data/test.csv")
    assert "bundled sample" not in done.stderr
    with open(tmp_path / "submissions" / "submission.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["ImageId", "Label"] and len(rows) == 301
    assert [int(r[0]) for r in rows[1:]] == list(range(1, 301))
    labels = np.array([int(r[1]) for r in rows[1:]])
    assert (labels == hidden).mean() > 0.85  # observed about 94% after 3 epochs on 1,800 digits
    assert not (tmp_path / "outputs" / "report" / "metrics.json").exists()  # nothing to score
