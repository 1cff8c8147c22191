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
from cli import UserError, run_cli


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
    assert_matches(dataset.read_csv(write_csv("x.csv", table, layout)), table, labelled)


@pytest.mark.parametrize(
    ("layout", "labelled", "expected"),
    [
        ("mnist-in-csv", True, "mnist-in-csv"),
        ("digit-recognizer-test", False, "digit-recognizer-test"),
        (None, True, "headerless"),
        (None, False, "headerless-unlabelled"),
    ],
)
def test_the_layout_is_recognised(write_csv, layout, labelled, expected):
    table = make_table(3, labelled=labelled)
    assert dataset.read_csv(write_csv("x.csv", table, layout)).layout == expected


@pytest.mark.parametrize(
    ("layout", "names"),
    [("fashion-mnist", ("T-shirt/top", "Ankle boot")), ("mnist-in-csv", ("0", "9"))],
)
def test_the_layout_carries_its_class_names(write_csv, layout, names):
    class_names = dataset.read_csv(write_csv("f.csv", make_table(3), layout)).class_names
    assert (class_names[0], class_names[9]) == names


@pytest.fixture
def containers(tmp_path) -> tuple[np.ndarray, dict[str, str]]:
    """One table written as a .csv.gz, a zip holding it, and a zip holding two CSVs."""
    table = make_table(20, seed=2)
    text = csv_text(table, dataset.LAYOUTS["mnist-in-csv"][0]).encode()
    (tmp_path / "a.csv.gz").write_bytes(gzip.compress(text))
    with zipfile.ZipFile(tmp_path / "one.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("mnist_train.csv", text)
    with zipfile.ZipFile(tmp_path / "two.zip", "w") as zf:
        zf.writestr("mnist_train.csv", text)
        zf.writestr("mnist_test.csv", csv_text(table[:5], dataset.LAYOUTS["mnist-in-csv"][0]))
    return table, {
        "gzip": str(tmp_path / "a.csv.gz"),
        "zip": str(tmp_path / "one.zip"),
        "named member": f"{tmp_path / 'two.zip'}::mnist_test.csv",
    }


@pytest.mark.parametrize(("container", "rows"), [("gzip", 20), ("zip", 20), ("named member", 5)])
def test_containers_parse_exactly(containers, container, rows):
    table, sources = containers
    assert_matches(dataset.read_csv(sources[container]), table[:rows])


def test_a_zip_members_source_names_the_member(containers):
    _, sources = containers
    assert dataset.read_csv(sources["named member"]).source.endswith("two.zip::mnist_test.csv")


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
    """Small chunks, and ink of every width (1, 2 and 3 digits) in random places."""
    monkeypatch.setattr(dataset, "CHUNK_BYTES", 4096)
    table = make_table(300, seed=5)
    ink = table[:, 1:] > 0
    widths = np.random.default_rng(0).choice([1, 9, 10, 99, 100, 255], int(ink.sum()))
    table[:, 1:][ink] = widths
    path = tmp_path / "big.csv"
    path.write_text(csv_text(table, None))
    assert_matches(dataset.read_csv(path), table)


# ---------------------------------------------------------------- bad input


def _row_text(table, row, col, value, layout="mnist-in-csv"):
    """The table as CSV text with one cell replaced by `value` (None: the cell removed)."""
    text = csv_text(table, dataset.LAYOUTS[layout][0])
    lines = text.splitlines()
    cells = lines[row].split(",")
    if value is None:
        del cells[col]
    else:
        cells[col] = value
    lines[row] = ",".join(cells)
    return "\n".join(lines) + "\n"


BAD_FILES = {  # name: how to write it from a good table, and what the error must say
    "empty.csv": (lambda table, header: "", "empty.csv: empty file"),
    "header-only.csv": (lambda table, header: header + "\n", "header-only.csv: header only"),
    "unknown-header.csv": (
        lambda table, header: "label,a,b,c\n1,2,3,4\n",
        "unknown-header.csv:1: unknown header label,a,b,...",
    ),
    "short-row.csv": (
        lambda table, header: _row_text(table, 3, 784, None),
        "short-row.csv:4: 784 columns, expected 785",
    ),
    "empty-cell.csv": (
        lambda table, header: _row_text(table, 2, 4, ""),
        "empty-cell.csv:3: column 5 (1x4): empty cell",
    ),
    "not-a-number.csv": (
        lambda table, header: _row_text(table, 2, 4, "abc"),
        "not-a-number.csv:3: column 5 (1x4): 'abc' is not a number",
    ),
    "pixel-too-big.csv": (
        lambda table, header: _row_text(table, 4, 784, "256"),
        "pixel-too-big.csv:5: column 785 (28x28): pixel 256 is",
    ),
    "pixel-negative.csv": (
        lambda table, header: _row_text(table, 1, 3, "-1"),
        "pixel-negative.csv:2: column 4 (1x3): pixel -1 is outside",
    ),
    "pixel-fraction.csv": (
        lambda table, header: _row_text(table, 1, 3, "12.5"),
        "column 4 (1x3): pixel 12.5 is not a whole number",
    ),
    "label-too-big.csv": (
        lambda table, header: _row_text(table, 5, 0, "10"),
        "label-too-big.csv:6: column 1 (label): label 10 is out",
    ),
    "headerless-width.csv": (
        lambda table, header: "1,2,3\n",
        "headerless-width.csv:1: 3 columns",
    ),
    "huge-integer.csv": (
        lambda table, header: _row_text(table, 2, 9, "9" * 400),
        "huge-integer.csv:3: column 10 (1x9): pixel 99999999999999999999... (400 characters) "
        "is outside 0..255",
    ),
    "underscore.csv": (  # Python's float() reads 1_0 as 10; a CSV number has no underscore
        lambda table, header: _row_text(table, 1, 2, "1_0"),
        "underscore.csv:2: column 3 (1x2): '1_0' is not a number",
    ),
}
BAD_CONTAINERS = {  # name: what the error must say
    "missing.csv": "missing.csv: no such file",
    "adir": "adir: is a directory",
    "nocsv.zip": "nocsv.zip: the zip holds no CSV file",
    "several.zip": "several.zip: the zip holds several CSV files: a.csv, b.csv",
    "several.zip::c.csv": "several.zip: no single member named c.csv",
    "corrupt.zip": "corrupt.zip: corrupt zip file",
    "corrupt.csv.gz": "corrupt.csv.gz: corrupt gzip file",
    "encrypted.zip": "encrypted.zip::a.csv: the member is encrypted",
    "deflate64.zip": "deflate64.zip::a.csv: compressed with Deflate64, which Python's zipfile",
}


def _zip_claiming(path, name: str, text: str, flags: int = 0, method: int = 0) -> None:
    """A zip whose one member's headers claim these flags (1: encrypted, as `zip -P` marks it)
    and compression method (9: Deflate64), which zipfile cannot write."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(name, text)
    raw = bytearray(path.read_bytes())
    for signature, at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # local, central header
        at += raw.index(signature)
        raw[at : at + 4] = flags.to_bytes(2, "little") + method.to_bytes(2, "little")
    path.write_bytes(bytes(raw))


def _write_bad_containers(tmp_path) -> None:
    table = make_table(5, seed=6)
    header = ",".join(dataset.LAYOUTS["mnist-in-csv"][0])
    with zipfile.ZipFile(tmp_path / "nocsv.zip", "w") as zf:
        zf.writestr("readme.txt", "nothing here")
    with zipfile.ZipFile(tmp_path / "several.zip", "w") as zf:
        zf.writestr("a.csv", header + "\n")
        zf.writestr("b.csv", header + "\n")
    (tmp_path / "adir").mkdir()
    (tmp_path / "corrupt.zip").write_bytes(b"PK\x03\x04 definitely not a zip")
    _zip_claiming(tmp_path / "encrypted.zip", "a.csv", header + "\n", flags=1)
    _zip_claiming(tmp_path / "deflate64.zip", "a.csv", header + "\n", method=9)
    good_gz = gzip.compress(csv_text(table, None).encode())
    (tmp_path / "corrupt.csv.gz").write_bytes(good_gz[: len(good_gz) // 2])


@pytest.fixture(params=[*BAD_FILES, *BAD_CONTAINERS])
def bad_input(request, tmp_path) -> tuple[str, str]:
    """Each bad input (a path) and what its error must say."""
    if request.param in BAD_FILES:
        write, expected = BAD_FILES[request.param]
        table = make_table(5, seed=6)
        header = ",".join(dataset.LAYOUTS["mnist-in-csv"][0])
        (tmp_path / request.param).write_text(write(table, header))
        return str(tmp_path / request.param), expected
    _write_bad_containers(tmp_path)
    return str(tmp_path / request.param), BAD_CONTAINERS[request.param]


def test_old_mac_line_ends_read_as_lines(tmp_path):
    table = make_table(40, seed=3)  # more than the first 64 KiB, which must hold a line end
    text = csv_text(table, dataset.LAYOUTS["mnist-in-csv"][0]).replace("\n", "\r")
    (tmp_path / "mac.csv").write_text(text, newline="")
    data = dataset.read_csv(tmp_path / "mac.csv")
    np.testing.assert_array_equal(data.labels, table[:, 0])
    np.testing.assert_array_equal(data.images.reshape(40, -1), table[:, 1:])


def test_a_link_to_nothing_is_not_called_a_missing_file(tmp_path):
    (tmp_path / "loop.csv").symlink_to(tmp_path / "loop.csv")
    (tmp_path / "broken.csv").symlink_to(tmp_path / "gone.csv")
    for name in ("loop.csv", "broken.csv"):
        with pytest.raises(UserError, match="a symbolic link to nothing"):
            dataset.read_csv(tmp_path / name)


def test_bad_input_raises_a_user_error_naming_file_line_and_column(bad_input):
    source, expected = bad_input
    with pytest.raises(UserError) as err:
        dataset.load_csv(source)
    assert expected in str(err.value)


def test_bad_input_on_the_command_line_is_one_error_line_and_exit_2(bad_input, capsys):
    source, expected = bad_input
    with pytest.raises(SystemExit) as exit_info:
        run_cli(dataset.main, ["explore", source, "--no-plots"])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: ")
    assert expected in line


def test_bad_cell_deep_in_a_large_file_names_its_line(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset, "CHUNK_BYTES", 4096)
    table = make_table(200, seed=7)
    (tmp_path / "deep.csv").write_text(_row_text(table, 157, 300, "x"))
    with pytest.raises(UserError, match=r"deep\.csv:158: column 301 \(11x20\): 'x' is not"):
        dataset.read_csv(tmp_path / "deep.csv")


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not beside this clone")
def test_the_real_ten_thousand_digits_load():
    data = dataset.read_csv(SHARED_DATA / "mnist_test.csv.gz")
    assert data.images.shape == (10000, 28, 28)
    assert data.layout == "mnist-in-csv"
    published = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]  # MNIST's test set
    assert np.bincount(data.labels).tolist() == published


@pytest.mark.parametrize("buffered", [True, False])
def test_output_into_a_closed_pipe_ends_quietly(tmp_path, buffered):
    """`python dataset.py explore | head` must not end in a BrokenPipeError traceback."""
    sample = dataset.SAMPLE_DIR / "mnist_test.csv.gz"
    explore = f"{sys.executable} {dataset.ROOT / 'dataset.py'} explore {sample} --no-plots"
    shell = f"{explore} 2>{tmp_path / 'err'} | head -c 0; echo ${{PIPESTATUS[0]}}"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env.update({} if buffered else {"PYTHONUNBUFFERED": "1"})
    done = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, env=env)
    assert (tmp_path / "err").read_text() == ""
    assert done.stdout.strip() == "141"  # head has gone before python prints
