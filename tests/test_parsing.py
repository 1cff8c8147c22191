"""CSV layouts, containers and every bad input the data layer must reject with one clear line."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from conftest import SHARED_DATA, csv_text, make_table

import dataset
from dataset import UserError


def assert_matches(parsed: dataset.CSVData, table: np.ndarray, labelled: bool = True) -> None:
    pixels = table[:, 1:] if labelled else table
    assert parsed.images.dtype == np.uint8
    assert parsed.images.shape == (len(table), 28, 28)
    np.testing.assert_array_equal(parsed.images.reshape(len(table), -1), pixels)
    if labelled:
        assert parsed.labels.dtype == np.int64
        np.testing.assert_array_equal(parsed.labels, table[:, 0])
    else:
        assert parsed.labels is None
    np.testing.assert_array_equal(parsed.ids, np.arange(1, len(table) + 1))


@pytest.mark.parametrize(
    ("layout", "labelled"),
    [
        ("mnist-in-csv", True),
        ("digit-recognizer", True),
        ("digit-recognizer-test", False),
        ("fashion-mnist", True),
        ("fashion-mnist-unlabelled", False),
        (None, True),
        (None, False),
    ],
)
def test_every_layout_parses_exactly(write_csv, layout, labelled):
    table = make_table(30, labelled=labelled, seed=1)
    parsed = dataset.read_csv(write_csv("x.csv", table, layout))
    assert_matches(parsed, table, labelled)
    expected = layout or ("headerless" if labelled else "headerless-unlabelled")
    assert parsed.layout == expected


def test_fashion_layout_carries_fashion_class_names(write_csv):
    parsed = dataset.read_csv(write_csv("f.csv", make_table(3), "fashion-mnist"))
    assert parsed.class_names[0] == "T-shirt/top" and parsed.class_names[9] == "Ankle boot"
    assert dataset.read_csv(write_csv("m.csv", make_table(3))).class_names[3] == "3"


def test_gzip_and_zip_containers(tmp_path):
    table = make_table(20, seed=2)
    text = csv_text(table, dataset.LAYOUTS["mnist-in-csv"][0]).encode()
    (tmp_path / "a.csv.gz").write_bytes(gzip.compress(text))
    with zipfile.ZipFile(tmp_path / "one.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("mnist_train.csv", text)
    with zipfile.ZipFile(tmp_path / "two.zip", "w") as zf:
        zf.writestr("mnist_train.csv", text)
        zf.writestr("mnist_test.csv", csv_text(table[:5], dataset.LAYOUTS["mnist-in-csv"][0]))
    assert_matches(dataset.read_csv(tmp_path / "a.csv.gz"), table)
    assert_matches(dataset.read_csv(tmp_path / "one.zip"), table)
    assert_matches(dataset.read_csv(f"{tmp_path / 'two.zip'}::mnist_test.csv"), table[:5])
    assert dataset.read_csv(f"{tmp_path / 'two.zip'}::mnist_train.csv").source.endswith(
        "two.zip::mnist_train.csv"
    )


@pytest.mark.parametrize(
    "transform",
    [
        lambda t: "\ufeff" + t,  # UTF-8 byte order mark
        lambda t: t.replace("\n", "\r\n"),  # Windows line endings
        lambda t: t.rstrip("\n"),  # no final newline
        lambda t: t + "\n\n",  # blank lines at the end
    ],
    ids=["bom", "crlf", "no-final-newline", "trailing-blank-lines"],
)
def test_harmless_variations_are_accepted(tmp_path, transform):
    table = make_table(12, seed=3)
    path = tmp_path / "v.csv"
    path.write_bytes(transform(csv_text(table, dataset.LAYOUTS["mnist-in-csv"][0])).encode())
    assert_matches(dataset.read_csv(path), table)


def test_whole_numbers_written_as_decimals_are_accepted(tmp_path):
    table = make_table(4, seed=4)
    text = csv_text(table, dataset.LAYOUTS["digit-recognizer"][0])
    lines = text.splitlines()
    cells = lines[2].split(",")
    cells[0], cells[7], cells[8] = f"{cells[0]}.0", "12.0", " 200 "
    table[1, 7], table[1, 8] = 12, 200
    lines[2] = ",".join(cells)
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    assert_matches(dataset.read_csv(tmp_path / "d.csv"), table)


def test_many_chunks_agree_with_a_plain_parse(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset, "CHUNK_BYTES", 4096)
    table = make_table(300, seed=5)
    table[:, 1:][table[:, 1:] > 0] = np.random.default_rng(0).choice([1, 9, 10, 99, 100, 255], 1)
    path = tmp_path / "big.csv"
    path.write_text(csv_text(table, None))
    assert_matches(dataset.read_csv(path), table)


# ---------------------------------------------------------------- bad input


def _row_text(table, row, col, value, layout="mnist-in-csv"):
    text = csv_text(table, dataset.LAYOUTS[layout][0])
    lines = text.splitlines()
    cells = lines[row].split(",")
    cells[col] = value
    lines[row] = ",".join(cells)
    return "\n".join(lines) + "\n"


def _bad_cases(tmp_path):
    table = make_table(5, seed=6)
    header = ",".join(dataset.LAYOUTS["mnist-in-csv"][0])
    short = csv_text(table, dataset.LAYOUTS["mnist-in-csv"][0]).splitlines()
    short[3] = short[3].rsplit(",", 1)[0]
    no_csv, several = tmp_path / "nocsv.zip", tmp_path / "several.zip"
    with zipfile.ZipFile(no_csv, "w") as zf:
        zf.writestr("readme.txt", "nothing here")
    with zipfile.ZipFile(several, "w") as zf:
        zf.writestr("a.csv", header + "\n")
        zf.writestr("b.csv", header + "\n")
    (tmp_path / "adir").mkdir()
    (tmp_path / "corrupt.zip").write_bytes(b"PK\x03\x04 definitely not a zip")
    good_gz = gzip.compress(csv_text(table, None).encode())
    (tmp_path / "corrupt.csv.gz").write_bytes(good_gz[: len(good_gz) // 2])
    files = {
        "empty.csv": "",
        "header-only.csv": header + "\n",
        "unknown-header.csv": "label,a,b,c\n1,2,3,4\n",
        "short-row.csv": "\n".join(short) + "\n",
        "empty-cell.csv": _row_text(table, 2, 4, ""),
        "not-a-number.csv": _row_text(table, 2, 4, "abc"),
        "pixel-too-big.csv": _row_text(table, 4, 784, "256"),
        "pixel-negative.csv": _row_text(table, 1, 3, "-1"),
        "pixel-fraction.csv": _row_text(table, 1, 3, "12.5"),
        "label-too-big.csv": _row_text(table, 5, 0, "10"),
        "headerless-width.csv": "1,2,3\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return [
        (tmp_path / "missing.csv", "missing.csv: no such file"),
        (tmp_path / "adir", "adir: is a directory"),
        (tmp_path / "empty.csv", "empty.csv: empty file"),
        (tmp_path / "header-only.csv", "header-only.csv: header only"),
        (tmp_path / "unknown-header.csv", "unknown-header.csv:1: unknown header label,a,b,..."),
        (tmp_path / "short-row.csv", "short-row.csv:4: 784 columns, expected 785"),
        (tmp_path / "empty-cell.csv", "empty-cell.csv:3: column 5 (1x4): empty cell"),
        (
            tmp_path / "not-a-number.csv",
            "not-a-number.csv:3: column 5 (1x4): 'abc' is not a number",
        ),
        (tmp_path / "pixel-too-big.csv", "pixel-too-big.csv:5: column 785 (28x28): pixel 256 is"),
        (
            tmp_path / "pixel-negative.csv",
            "pixel-negative.csv:2: column 4 (1x3): pixel -1 is outside",
        ),
        (tmp_path / "pixel-fraction.csv", "column 4 (1x3): pixel 12.5 is not a whole number"),
        (tmp_path / "label-too-big.csv", "label-too-big.csv:6: column 1 (label): label 10 is out"),
        (tmp_path / "headerless-width.csv", "headerless-width.csv:1: 3 columns"),
        (no_csv, "nocsv.zip: the zip holds no CSV file"),
        (several, "several.zip: the zip holds several CSV files: a.csv, b.csv"),
        (f"{several}::c.csv", "several.zip: no single member named c.csv"),
        (tmp_path / "corrupt.zip", "corrupt.zip: corrupt zip file"),
        (tmp_path / "corrupt.csv.gz", "corrupt.csv.gz: corrupt gzip file"),
    ]


def test_every_bad_input_gets_one_line_naming_file_line_and_column(tmp_path, capsys):
    for source, expected in _bad_cases(tmp_path):
        with pytest.raises(UserError) as err:
            dataset.load_csv(source)
        assert expected in str(err.value), (source, str(err.value))
        with pytest.raises(SystemExit) as exit_info:
            dataset.run_cli(dataset.main, ["explore", str(source), "--no-plots"])
        assert exit_info.value.code == 2
        errors = capsys.readouterr().err
        assert errors.count("\n") == 1 and errors.startswith("error: "), errors
        assert expected in errors and "Traceback" not in errors


def test_bad_cell_deep_in_a_large_file_names_its_line(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset, "CHUNK_BYTES", 4096)
    table = make_table(200, seed=7)
    (tmp_path / "deep.csv").write_text(_row_text(table, 157, 300, "x"))
    with pytest.raises(UserError, match=r"deep\.csv:158: column 301 \(11x20\): 'x' is not"):
        dataset.read_csv(tmp_path / "deep.csv")


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not beside this clone")
def test_the_real_ten_thousand_digits_load():
    data = dataset.read_csv(SHARED_DATA / "mnist_test.csv.gz")
    assert data.images.shape == (10000, 28, 28) and data.layout == "mnist-in-csv"
    assert set(np.unique(data.labels)) == set(range(10))
    # the MNIST test set's published class counts
    assert np.bincount(data.labels).tolist() == [
        980,
        1135,
        1032,
        1010,
        982,
        892,
        958,
        1028,
        974,
        1009,
    ]


def test_output_into_a_closed_pipe_ends_quietly(tmp_path):
    """`python dataset.py explore | head` must not end in a BrokenPipeError traceback."""
    sample = dataset.SAMPLE_DIR / "mnist_test.csv.gz"
    explore = f"{sys.executable} {dataset.ROOT / 'dataset.py'} explore {sample} --no-plots"
    shell = f"{explore} 2>{tmp_path / 'err'} | head -c 0; echo ${{PIPESTATUS[0]}}"
    for buffered in (True, False):
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
        env.update({} if buffered else {"PYTHONUNBUFFERED": "1"})
        done = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, env=env)
        assert (tmp_path / "err").read_text() == "", buffered
        assert done.stdout.strip() == "141", buffered  # head has gone before python prints
