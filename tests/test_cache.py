"""The parse cache: repeat loads skip parsing, a changed CSV is parsed again, writes are atomic."""

from __future__ import annotations

import os
import zipfile

import numpy as np
import pytest
from conftest import csv_text, make_table

import dataset
from cli import UserError


def _forbid_parsing(monkeypatch):
    def fail(data, where):
        raise AssertionError(f"{where} parsed again instead of read from the cache")

    monkeypatch.setattr(dataset, "parse_csv_bytes", fail)


def test_repeat_load_comes_from_the_cache(write_csv, monkeypatch):
    table = make_table(25, seed=1)
    path = write_csv("c.csv", table)
    first = dataset.load_csv(path)
    _forbid_parsing(monkeypatch)
    again = dataset.load_csv(path)
    np.testing.assert_array_equal(again.images, first.images)
    np.testing.assert_array_equal(again.labels, table[:, 0])
    assert (again.layout, again.source) == (first.layout, first.source)


def test_unlabelled_data_round_trips_through_the_cache(write_csv, monkeypatch):
    path = write_csv("u.csv", make_table(5, labelled=False), "digit-recognizer-test")
    first = dataset.load_csv(path)
    _forbid_parsing(monkeypatch)
    again = dataset.load_csv(path)
    assert (again.labels, again.layout) == (None, "digit-recognizer-test")
    np.testing.assert_array_equal(again.images, first.images)


def test_a_changed_csv_is_parsed_again(write_csv):
    path = write_csv("c.csv", make_table(10, seed=1))
    dataset.load_csv(path)
    stat = path.stat()
    changed = make_table(10, seed=2)
    write_csv("c.csv", changed)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime: size or inode tells
    np.testing.assert_array_equal(dataset.load_csv(path).labels, changed[:, 0])


def test_a_damaged_cache_entry_is_replaced(write_csv):
    table = make_table(8, seed=3)
    path = write_csv("c.csv", table)
    dataset.load_csv(path)
    (entry,) = dataset.cache_dir().glob("*.npz")
    entry.write_bytes(b"garbage")
    np.testing.assert_array_equal(dataset.load_csv(path).labels, table[:, 0])
    with np.load(entry) as cached:
        assert cached["images"].shape == (8, 28, 28)


def test_a_failed_cache_write_leaves_no_partial_file(write_csv, monkeypatch):
    path = write_csv("c.csv", make_table(8, seed=4))

    def broken_savez(f, **arrays):
        f.write(b"half of an entry")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    assert len(dataset.load_csv(path)) == 8  # the data still loads
    assert list(dataset.cache_dir().iterdir()) == []


def test_cache_off_never_writes(write_csv):
    dataset.load_csv(write_csv("c.csv", make_table(3)), cache=False)
    assert list(dataset.cache_dir().glob("*")) == []


def test_bad_input_is_reported_through_the_cache_too(tmp_path):
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(UserError, match="empty file"):
        dataset.load_csv(tmp_path / "e.csv")


def test_a_cached_load_names_the_file_as_its_caller_does(write_csv, tmp_path, monkeypatch):
    path = write_csv("c.csv", make_table(3))
    monkeypatch.chdir(tmp_path)
    assert dataset.load_csv("c.csv").source == "c.csv"
    _forbid_parsing(monkeypatch)
    assert dataset.load_csv(path).source == str(path)


def test_a_cached_zip_member_keeps_its_member_name(tmp_path, monkeypatch):
    header = dataset.LAYOUTS["mnist-in-csv"][0]
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as zf:
        zf.writestr("mnist_train.csv", csv_text(make_table(3), header))
    monkeypatch.chdir(tmp_path)
    dataset.load_csv("a.zip")
    _forbid_parsing(monkeypatch)
    assert dataset.load_csv(tmp_path / "a.zip").source == f"{tmp_path / 'a.zip'}::mnist_train.csv"


def test_a_first_parse_of_a_big_file_says_so_and_a_cached_load_does_not(
    write_csv, monkeypatch, capsys
):
    path = write_csv("big.csv", make_table(30, seed=2))
    size = os.path.getsize(path)  # plain text: its size is the CSV's
    monkeypatch.setattr(dataset, "ANNOUNCED_BYTES", size)
    dataset.load_csv(path)
    before, after = capsys.readouterr().err.splitlines()
    assert before.startswith(f"parsing {path} (") and "MB of CSV) into the parse cache" in before
    assert after.startswith("parsed 30 rows in ")
    dataset.load_csv(path)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(dataset, "ANNOUNCED_BYTES", size + 1)
    dataset.load_csv(path, cache=False)  # smaller than the threshold: parsed without a word
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "edit",
    [
        {"labels": np.full(6, 200)},  # a label no class has
        {"images": np.zeros((6, 5, 5), np.uint8)},  # not 28x28
        {"images": np.zeros((6, 28, 28), np.float64)},  # not the parser's bytes
        {"labels": np.zeros(3, np.int64)},  # not one per row
        {"layout": "whatever"},
    ],
)
def test_a_cache_entry_edited_under_its_key_is_parsed_again(write_csv, edit):
    table = make_table(6, seed=4)
    path = write_csv("e.csv", table)
    dataset.load_csv(path)
    entry, _ = dataset._cache_entry(path)
    with np.load(entry) as cached:
        fields = {name: cached[name] for name in cached.files}
    np.savez(entry, **{**fields, **edit})  # the key kept: only the content lies
    again = dataset.load_csv(path)
    np.testing.assert_array_equal(again.labels, table[:, 0])
    np.testing.assert_array_equal(again.images.reshape(6, -1), table[:, 1:])
