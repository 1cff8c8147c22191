"""Hardening: whatever input or flag a user gives ends in a result or in one short, printable
error line with exit code 2. One section a finding of the hardening issue (its rows 1 to 11);
faults of the machine (full disk, signals) are in test_faults.py, the CSV fuzzer in test_fuzz.py."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tracemalloc
import zipfile
import zlib

import numpy as np
import pytest
import torch
from conftest import ROOT, SAMPLE_TEST, SAMPLE_TRAIN, csv_text, run_flags
from PIL import Image

import dataset
import images
import model
import predict
import train
from atomic import atomic_write
from cli import MAX_ERROR_CHARS, UserError, run_cli

HEADER = dataset.LAYOUTS["mnist-in-csv"][0]


def balanced(per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """`per_class` real digits of each class, interleaved (0, 1, ..., 9, 0, 1, ...)."""
    sample = dataset.load_csv(SAMPLE_TRAIN)
    rows = np.stack([np.flatnonzero(sample.labels == c)[:per_class] for c in range(10)], 1)
    return sample.images[rows.ravel()], sample.labels[rows.ravel()]


def write(path, images: np.ndarray, labels: np.ndarray | None, header=HEADER):
    table = images.reshape(len(images), -1)
    if labels is not None:
        table = np.column_stack([labels, table])
    path.write_text(csv_text(table, header))
    return path


def run(main, argv: list[str], capsys) -> tuple[int, str]:
    """A CLI run: its exit code (0 when it returned) and its error line, checked to be one."""
    try:
        run_cli(main, argv)
    except SystemExit as exit_info:
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1, err
        return exit_info.code, lines[0]
    return 0, ""


def quick(folder, *extra: str) -> list[str]:
    return run_flags(folder, "--deterministic", *extra)


# ---------------------------------------------------------------- 1. small training sets


@pytest.mark.numerics
@pytest.mark.parametrize(
    ("per_class", "flags"),
    [
        (5, []),  # 50 rows: 10% of 5 rounds to no validation row in any class
        (10, ["--max-rows", "20"]),
        (10, ["--val-split", "0.99"]),  # 99% of 10 rounds to every row of each class
        (10, ["--max-rows", "2"]),
    ],
)
def test_a_small_training_set_trains_on_non_empty_splits(tmp_path, per_class, flags):
    source = write(tmp_path / "small.csv", *balanced(per_class))
    train.main(quick(tmp_path, "--train", str(source), "--epochs", "1", "--arch", "basic", *flags))
    seen = model.load_checkpoint(tmp_path / "models" / "best.pt")["seen_rows"]
    assert (len(seen["train"]) > 0, len(seen["val"]) > 0) == (True, True)


def test_one_labelled_row_is_refused_in_one_line(tmp_path, capsys):
    images, labels = balanced(1)
    source = write(tmp_path / "one.csv", images[:1], labels[:1])
    code, line = run(train.main, quick(tmp_path, "--train", str(source)), capsys)
    assert code == 2
    assert "one.csv: 1 labelled row; training needs at least 2" in line


@pytest.mark.parametrize(
    ("counts", "fraction"),
    [([1] * 10, 0.1), ([5] * 10, 0.1), ([2, 1], 0.5), ([10] * 10, 0.99), ([1, 1], 0.99)],
)
def test_a_stratified_split_is_never_empty_on_either_side(counts, fraction):
    labels = np.repeat(np.arange(len(counts)), counts)
    train_rows, val_rows = dataset.stratified_split(labels, fraction, seed=0)
    assert (len(train_rows) > 0, len(val_rows) > 0) == (True, True)


# ---------------------------------------------------------------- 2. decompression bombs


def _oversize_csv(limit: int) -> bytes:
    """A valid CSV a little larger than `limit` bytes."""
    images, labels = balanced(10)
    text = csv_text(np.column_stack([labels, images.reshape(100, -1)]), HEADER).encode()
    rows = text.split(b"\n", 1)[1]
    return text + rows * (limit // len(rows) + 1)


def _as(container: str, data: bytes, path):
    if container == "gz":
        path = path.with_suffix(".csv.gz")
        path.write_bytes(gzip.compress(data, compresslevel=1))
    elif container == "zip":
        path = path.with_suffix(".zip")
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("mnist_train.csv", data)
    else:
        path.write_bytes(data)
    return path


def _peak_bytes(fn) -> int:
    """The most memory Python and NumPy held at once while `fn` ran."""
    tracemalloc.start()
    with contextlib.suppress(UserError):
        fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


@pytest.mark.parametrize("container", ["gz", "zip", "csv"])
def test_more_csv_than_the_limit_is_refused(tmp_path, monkeypatch, container):
    path = _as(container, _oversize_csv(1 << 20), tmp_path / "big.csv")
    monkeypatch.setenv("MNIST_MAX_CSV_BYTES", str(1 << 20))
    with pytest.raises(UserError, match="holds more than 1,048,576 bytes of CSV, the limit"):
        dataset.read_csv(path)


@pytest.mark.parametrize("value", ["abc", "1e9", "10.5", "-1", "0"])
def test_a_csv_limit_that_is_no_count_of_bytes_is_refused_in_one_line(monkeypatch, value):
    monkeypatch.setenv("MNIST_MAX_CSV_BYTES", value)
    with pytest.raises(UserError, match=r"\$MNIST_MAX_CSV_BYTES .*: not a positive whole number"):
        dataset.read_csv(SAMPLE_TEST)


def test_an_empty_cache_dir_setting_means_the_default(monkeypatch):
    monkeypatch.setenv("MNIST_CACHE_DIR", "")
    assert dataset.cache_dir() == dataset.DATA_DIR / ".cache"


@pytest.mark.parametrize("container", ["gz", "zip"])
def test_reading_stops_at_the_limit(tmp_path, monkeypatch, container):
    path = _as(container, _oversize_csv(32 << 20), tmp_path / "big.csv")  # 32 MiB inside
    monkeypatch.setenv("MNIST_MAX_CSV_BYTES", str(1 << 20))
    assert _peak_bytes(lambda: dataset.read_csv(path)) < 8 << 20  # a few copies of 1 MiB


def _nul_bomb(path, size: int) -> None:
    """A .csv.gz of `size` NUL bytes, written without holding them in memory."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing
    chunk = bytes(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(packer.compress(chunk))
        f.write(packer.flush())


def test_a_bomb_of_nul_bytes_is_refused_after_its_first_bytes(tmp_path):
    bomb = tmp_path / "bomb.csv.gz"
    _nul_bomb(bomb, 256 << 20)  # 256 MiB of NULs in about 256 KB
    with pytest.raises(UserError, match=r"bomb\.csv\.gz: binary data at byte 0"):
        dataset.read_csv(bomb)
    assert _peak_bytes(lambda: dataset.read_csv(bomb)) < 1 << 20


def test_a_first_line_without_end_is_refused_after_its_first_bytes(tmp_path):
    path = tmp_path / "long.csv"
    path.write_bytes(b"1" * (5 << 20))
    with pytest.raises(UserError, match=r"long\.csv:1: no line end in the first 65,536 bytes"):
        dataset.read_csv(path)


# ---------------------------------------------------------------- 3. --resume and where it writes


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """Two finished runs of two epochs: `basic` with no schedule, and the default onecycle."""
    runs = {}
    for name, flags in (("plain", ["--scheduler", "none"]), ("onecycle", [])):
        folder = tmp_path_factory.mktemp(name)
        args = quick(folder, "--train", str(SAMPLE_TRAIN), "--max-rows", "400", "--epochs", "2")
        train.main([*args, "--arch", "basic", *flags])
        runs[name] = folder
    return runs


@pytest.mark.numerics
def test_a_copied_last_pt_resumes_beside_the_copy_and_leaves_the_original(finished, tmp_path):
    original = finished["plain"] / "models"
    before = {name: (original / name).read_bytes() for name in ("best.pt", "last.pt")}
    shutil.copy(original / "last.pt", tmp_path / "last.pt")
    train.main(["--resume", str(tmp_path / "last.pt"), "--epochs", "3", "--quiet", "--no-plots"])
    assert {name: (original / name).read_bytes() for name in before} == before
    assert model.load_checkpoint(tmp_path / "last.pt")["epoch"] == 3
    assert (tmp_path / "history.csv").is_file()  # the outputs go beside the copy too


@pytest.mark.numerics
def test_resume_writes_where_model_dir_says(finished, tmp_path):
    last = finished["plain"] / "models" / "last.pt"
    train.main(["--resume", str(last), "--epochs", "3", "--model-dir", str(tmp_path), "--quiet"])
    assert model.load_checkpoint(tmp_path / "last.pt")["epoch"] == 3
    assert model.load_checkpoint(last)["epoch"] == 2


@pytest.mark.parametrize(
    ("run_name", "flags", "expected"),
    [
        (
            "onecycle",
            ["--epochs", "4"],
            "--epochs 4: the onecycle schedule of this run was laid out",
        ),
        ("plain", ["--epochs", "1"], "--epochs 1: 2 epochs are trained already"),
        ("plain", ["--lr", "0.5"], "--lr 0.5: a resumed run keeps its settings (--lr 0.003)"),
        ("plain", ["--arch", "strong"], "--arch strong: a resumed run keeps its settings"),
    ],
)
def test_a_resume_that_cannot_do_as_asked_is_refused(
    finished, tmp_path, capsys, run_name, flags, expected
):
    last = finished[run_name] / "models" / "last.pt"
    code, line = run(
        train.main, ["--resume", str(last), "--model-dir", str(tmp_path), *flags], capsys
    )
    assert code == 2
    assert expected in line


# damage: (a field of last.pt, or of its config, and the value put there)
REPLACED = {
    "optimizer without groups": ("optimizer", {"state": {}, "param_groups": []}),
    "optimizer a string": ("optimizer", "adamw"),
    "config a string": ("config", "strong"),
    "epoch a string": ("epoch", "two"),
}
REPLACED_SETTING = {
    "config arch not the weights'": ("arch", "strong"),
    "batch size 0": ("batch_size", 0),
    "epochs a string": ("epochs", "many"),
}


def _damaged_last(last: dict, damage: str) -> dict:
    """A copy of a last.pt's fields, damaged as `damage` says."""
    last = {**last, "rng": dict(last["rng"]), "config": dict(last["config"])}
    if damage in REPLACED:
        key, value = REPLACED[damage]
        last[key] = value
    elif damage in REPLACED_SETTING:
        key, value = REPLACED_SETTING[damage]
        last["config"][key] = value
    elif damage == "short rng state":
        rng = last["rng"]
        rng |= {"torch": rng["torch"][:10], "ranks": [state[:10] for state in rng.get("ranks", [])]}
    elif damage == "lr nan":
        groups = [{**g, "lr": float("nan")} for g in last["optimizer"]["param_groups"]]
        last["optimizer"] = {**last["optimizer"], "param_groups": groups}
    elif damage == "no config":
        del last["config"]
    return last


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("short rng state", "its training state does not fit this run"),
        ("optimizer without groups", "its training state does not fit this run"),
        ("optimizer a string", "its training state does not fit this run"),
        ("lr nan", "its optimizer's learning rates [nan] are not numbers"),
        ("config a string", "config is not a dictionary of settings"),
        ("config arch not the weights'", "its settings name arch 'strong', its weights 'basic'"),
        ("batch size 0", "its saved setting --batch-size 0: must be at least 1"),
        ("epochs a string", "its setting epochs 'many' is not int"),
        ("no config", "its settings are missing"),
        ("epoch a string", "epoch 'two' is not a count of epochs trained"),
    ],
)
def test_a_damaged_last_pt_is_refused_in_one_line(finished, tmp_path, capsys, damage, expected):
    last = model.load_checkpoint(finished["plain"] / "models" / "last.pt")
    model.save_checkpoint(tmp_path / "last.pt", _damaged_last(last, damage))
    code, line = run(train.main, ["--resume", str(tmp_path / "last.pt"), "--epochs", "3"], capsys)
    assert code == 2
    assert f"{tmp_path / 'last.pt'}: " in line and expected in line


# ---------------------------------------------------------------- 5. a diverged run


@pytest.mark.numerics
@pytest.mark.parametrize(
    ("batch_size", "where"), [("512", "batch 1 (the last)"), ("64", "batch 2:")]
)
def test_a_diverged_run_stops_with_one_line_and_saves_nothing(tmp_path, capsys, batch_size, where):
    flags = ["--train", str(SAMPLE_TRAIN), "--max-rows", "400", "--lr", "1e30"]
    code, line = run(train.main, quick(tmp_path, *flags, "--batch-size", batch_size), capsys)
    assert code == 2
    assert f"epoch 1, {where}" in line
    assert "try a lower --lr than 1e+30" in line
    assert not (tmp_path / "models" / "best.pt").exists()


@pytest.mark.numerics
def test_weights_that_go_non_finite_later_never_replace_the_best(tmp_path, monkeypatch, capsys):
    """The loss turns NaN in epoch 2: best.pt and last.pt stay those of epoch 1."""
    real = torch.nn.functional.cross_entropy
    calls = {"training": 0}

    def poisoned(logits, target, **kwargs):
        loss = real(logits, target, **kwargs)
        if "label_smoothing" in kwargs:  # a training batch, not scoring
            calls["training"] += 1
            if calls["training"] > 4:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)
    flags = ["--train", str(SAMPLE_TRAIN), "--max-rows", "450", "--batch-size", "100"]
    code, line = run(
        train.main, quick(tmp_path, *flags, "--epochs", "3", "--arch", "basic"), capsys
    )
    assert (code, "epoch 2, batch 1: the loss is nan" in line) == (2, True)
    for name in ("best.pt", "last.pt"):
        ckpt = model.load_checkpoint(tmp_path / "models" / name)
        assert ckpt["epoch"] == 1
        assert all(w.isfinite().all() for w in ckpt["state_dict"].values() if w.is_floating_point())


# ---------------------------------------------------------------- 6. error lines


def _bad_files(folder) -> dict[str, str]:
    """Files whose error lines once ran to megabytes or printed control bytes."""
    (folder / "no-separators.csv").write_bytes(b"7" * (20 << 20))
    wide = ",".join(f"column-number-{i}" for i in range(700))
    (folder / "wide-header.csv").write_text(f"{wide}\n" + ",".join(["1"] * 700) + "\n")
    (folder / "utf16.csv").write_bytes(csv_text(np.zeros((2, 785), int), HEADER).encode("utf-16"))
    (folder / "escapes.csv").write_bytes(b"\x1b[31mred\x1b[0m,\x07bell\x08,\x7f\n1,2,3\n")
    (folder / "binary.csv").write_bytes(bytes(range(256)) * 64)
    return {path.name: str(path) for path in folder.iterdir()}


@pytest.mark.parametrize(
    "name", ["no-separators.csv", "wide-header.csv", "utf16.csv", "escapes.csv", "binary.csv"]
)
def test_every_error_line_is_short_and_printable(tmp_path, capsys, name):
    code, line = run(dataset.main, ["explore", _bad_files(tmp_path)[name], "--no-plots"], capsys)
    assert code == 2
    assert len(line) <= len("error: ") + MAX_ERROR_CHARS
    assert line.isprintable()


def test_an_unknown_header_names_its_column_count(tmp_path, capsys):
    _, line = run(dataset.main, ["explore", _bad_files(tmp_path)["wide-header.csv"]], capsys)
    assert "with 700 columns" in line


# ---------------------------------------------------------------- 7. explore on a few rows


@pytest.mark.parametrize("rows", [1, 3, 7])
def test_explore_draws_its_figures_for_a_few_rows(tmp_path, rows):
    images, labels = balanced(1)
    source = write(tmp_path / "few.csv", images[:rows], labels[:rows])
    written = dataset.explore(str(source), tmp_path / "out")["rows"]
    assert written == rows
    assert len(list((tmp_path / "out").glob("*.png"))) == 3


# ---------------------------------------------------------------- 8. huge images


def _png_claiming(path, width: int, height: int) -> None:
    """A PNG whose header claims width x height (what a decompression bomb looks like at first)."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data[12:29]  # chunk type and 13 bytes of IHDR
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("side", [14000, 10000])
def test_a_huge_image_is_refused_before_it_is_read(tmp_path, side):
    _png_claiming(tmp_path / "huge.png", side, side)
    with pytest.raises(UserError, match=r"huge\.png: more than 50,000,000 pixels, too large"):
        images.preprocess_image(tmp_path / "huge.png")


def test_a_large_photo_is_prepared_like_a_small_one(tmp_path):
    digit = 255 - dataset.load_csv(SAMPLE_TEST).images[3]
    for name, scale in (("small", 10), ("large", 160)):  # 280 and 4,480 pixels a side
        Image.fromarray(digit).resize((28 * scale, 28 * scale), Image.BICUBIC).save(
            tmp_path / f"{name}.jpg"
        )
    small, large = (images.preprocess_image(tmp_path / f"{n}.jpg") for n in ("small", "large"))
    assert np.abs(small.astype(int) - large).mean() < 8


def _digit_as(kind: str, path) -> None:
    """A real test digit (dark ink on light paper) saved as `kind`."""
    paper = 255 - dataset.load_csv(SAMPLE_TEST).images[3].astype(np.float64)  # 0 ink .. 255 paper
    if kind == "16-bit scan":  # ink 8000 on paper 60000, as a flatbed scanner writes
        Image.fromarray((8000 + paper * (52000 / 255)).astype(np.uint16)).save(path, "PNG")
    elif kind == "float TIFF":  # gray levels 0..1
        Image.fromarray((paper / 255).astype(np.float32)).save(path, "TIFF")
    elif kind == "LAB TIFF":
        lab = np.zeros((28, 28, 3), np.uint8)
        lab[..., 0] = paper
        Image.fromarray(lab, "LAB").save(path, "TIFF")
    else:
        Image.fromarray(paper.astype(np.uint8)).save(path, "PNG")


@pytest.mark.parametrize("kind", ["16-bit scan", "float TIFF", "LAB TIFF"])
def test_wide_gray_and_lab_images_read_as_the_8_bit_digit(tmp_path, kind):
    _digit_as("8-bit", tmp_path / "plain.png")
    _digit_as(kind, tmp_path / "other")
    plain = images.preprocess_image(tmp_path / "plain.png")
    other = images.preprocess_image(tmp_path / "other")
    assert np.abs(plain.astype(int) - other).mean() < 4


def _ico_holding_a_large_png(path) -> None:
    """An ICO whose one frame is a 6,000 x 6,000 PNG (Pillow decodes it on opening)."""
    import io

    png = io.BytesIO()
    Image.new("L", (6000, 6000), 255).save(png, "PNG")
    frame = png.getvalue()
    header = struct.pack("<HHH", 0, 1, 1) + struct.pack(
        "<BBBBHHII", 0, 0, 0, 0, 1, 32, len(frame), 22
    )
    path.write_bytes(header + frame)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (_ico_holding_a_large_png, "not a readable image (give a PNG, JPEG, GIF, BMP, TIFF"),
        (lambda path: os.mkfifo(path), "is a directory, pipe or device, not an image file"),
        (lambda path: path.mkdir(), "is a directory, pipe or device, not an image file"),
    ],
)
def test_containers_and_non_files_are_refused_unread(tmp_path, monkeypatch, make, expected):
    from PIL import IcoImagePlugin

    def decode(self):
        raise AssertionError("the ICO was opened, decoding its 36-million-pixel frame")

    monkeypatch.setattr(IcoImagePlugin.IcoImageFile, "_open", decode)
    make(tmp_path / "image")
    with pytest.raises(UserError, match=re.escape(expected)):
        images.preprocess_image(tmp_path / "image")


# ---------------------------------------------------------------- 9. checkpoints that load but lie


EPOCH = {"epoch": 1, "train_loss": 0.5, "train_acc": 0.9, "val_loss": 0.4, "val_acc": 0.9}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> dict:
    """A real checkpoint's fields, with a network that fits them."""
    net = model.build("basic")
    return {
        "arch": "basic",
        "arch_kwargs": {"num_classes": 10},
        "state_dict": net.state_dict(),
        "mean": 0.13,
        "std": 0.31,
        "class_names": list("0123456789"),
    }


@pytest.mark.parametrize(
    ("lie", "expected"),
    [
        ({"arch": "resnet999"}, "architecture 'resnet999' is not one of basic, lenet"),
        ({"arch_kwargs": {"num_classes": 10, "colour": 3}}, "are not arguments of basic"),
        (
            {"arch_kwargs": {"num_classes": 10**8}},
            "num_classes=100000000 is not a whole number in 2..1000",
        ),
        ({"class_names": ["a", "b", "c"]}, "3 class names for a 10-class network"),
        ({"mean": "abc"}, "mean 'abc' is not a pixel statistic of pixels scaled to 0..1"),
        ({"mean": 200.0}, "mean 200.0 is not a pixel statistic of pixels scaled to 0..1"),
        ({"std": 0.0}, "std 0.0 is not a pixel statistic of pixels scaled to 0..1"),
        ({"format": "1"}, "checkpoint format '1' is not 1"),
        ({"format": torch.tensor(1)}, "checkpoint format tensor(1) is not 1"),
        ({"state_dict": {0: torch.zeros(3)}}, "state_dict is not a dictionary of named weight"),
        ({"state_dict": "weights"}, "state_dict is not a dictionary of named weight"),
        ({"state_dict": "nan"}, "weight 0.weight is not finite (NaN or infinite values)"),
        ({"state_dict": "inf"}, "weight 0.weight is not finite (NaN or infinite values)"),
        ({"class_names": [""] * 10}, "class name '' is not 1..100 printable characters"),
        ({"class_names": [*"012345678", "a,b"]}, "class name 'a,b' is not 1..100 printable"),
        ({"class_names": [*"012345678", "a\nb"]}, "class name 'a\\nb' is not 1..100"),
        ({"class_names": [*"012345678", "0"]}, "class_names names a class twice"),
        ({"config": "strong"}, "config is not a dictionary of settings"),
        ({"config": None}, "config is not a dictionary of settings"),
        ({"seen_rows": {"train": torch.zeros(2, dtype=torch.int64)}}, "seen_rows is not the leak"),
        ({"seen_rows": [1, 2]}, "seen_rows is not the leak guard's row hashes"),
        ({"history": [{**EPOCH, "epoch": 1e30}]}, "history is not a list of epoch records"),
        ({"history": [{**EPOCH, "val_loss": float("nan")}]}, "history is not a list of epoch"),
        ({"state_dict": {"0.weight": torch.zeros(3)}}, "weights do not fit basic"),
        ({"temperature": -1.0}, "temperature -1.0 is not a positive number"),
        ({"temperature": float("nan")}, "temperature nan is not a positive number"),
        ({"history": [{"epoch": 1}]}, "history is not a list of epoch records"),
        ({"history": "epochs"}, "history is not a list of epoch records"),
        ({"data": {"source": 3}}, "data is not a record of the training source"),
    ],
)
def test_a_lying_checkpoint_is_refused_before_anything_is_written(
    tmp_path, capsys, checkpoint, lie, expected
):
    if lie.get("state_dict") in ("nan", "inf"):  # the real weights, one of them not finite
        weights = {k: v.clone() for k, v in checkpoint["state_dict"].items()}
        weights["0.weight"][0, 0, 0, 0] = float(lie["state_dict"])
        lie = {"state_dict": weights}
    model.save_checkpoint(tmp_path / "lie.pt", {**checkpoint, **lie})
    output = tmp_path / "submission.csv"
    argv = [
        "--checkpoint",
        str(tmp_path / "lie.pt"),
        "--input",
        str(SAMPLE_TEST),
        "--output",
        str(output),
    ]
    code, line = run(predict.main, [*argv, "--device", "cpu"], capsys)
    assert code == 2
    assert expected in line
    assert "--arch" not in line  # the checkpoint's fault, not a flag's
    assert not output.exists()


# ---------------------------------------------------------------- 10. common CSV variants


def _variant(name: str, table: np.ndarray) -> bytes:
    text = csv_text(table, HEADER)
    if name == "quoted cells":
        return "\n".join(
            ",".join(f'"{c}"' for c in line.split(",")) for line in text.splitlines()
        ).encode()
    if name == "pandas index":
        lines = text.splitlines()
        return "\n".join(
            [f",{lines[0]}", *(f"{i},{row}" for i, row in enumerate(lines[1:]))]
        ).encode()
    if name == "semicolons":
        return text.replace(",", ";").encode()
    return text.replace(",", "\t").encode()  # tabs


@pytest.mark.parametrize("name", ["quoted cells", "pandas index", "semicolons", "tabs"])
def test_an_unambiguous_csv_variant_loads_as_the_plain_file(tmp_path, name):
    images, labels = balanced(1)
    table = np.column_stack([labels, images.reshape(10, -1)])
    (tmp_path / "v.csv").write_bytes(_variant(name, table))
    parsed = dataset.read_csv(tmp_path / "v.csv")
    np.testing.assert_array_equal(parsed.images, images)
    np.testing.assert_array_equal(parsed.labels, labels)


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("utf16", "UTF-16 text (re-save it as UTF-8"),
        ("scaled", "pixels scaled to 0..1? multiply them by 255"),
        ("index", "column 1 has no name and is not 0, 1, 2, ... (if it is pandas' index"),
    ],
)
def test_an_ambiguous_csv_variant_gets_a_hint(tmp_path, text, hint):
    table = np.zeros((3, 785), int)
    plain = csv_text(table, HEADER)
    data = {
        "utf16": plain.encode("utf-16"),
        "scaled": plain.replace(",0\n", ",0.5\n").encode(),
        "index": "\n".join(
            [
                f",{line}" if i == 0 else f"{i + 4},{line}"
                for i, line in enumerate(plain.splitlines())
            ]
        ).encode(),
    }[text]
    (tmp_path / "v.csv").write_bytes(data)
    with pytest.raises(
        UserError, match=hint.replace("(", r"\(").replace("?", r"\?").replace(".", r"\.")
    ):
        dataset.read_csv(tmp_path / "v.csv")


# ---------------------------------------------------------------- 11. the smaller ones


def test_a_malformed_device_name_is_a_user_error():
    with pytest.raises(UserError, match="--device cpu:foo: unknown device"):
        model.pick_device("cpu:foo")


def test_a_fifo_at_a_cache_entry_does_not_hang_the_load(tmp_path):
    source = write(tmp_path / "c.csv", *balanced(1))
    script = f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
os.environ["MNIST_CACHE_DIR"] = {str(tmp_path / "cache")!r}
import dataset
entry, _ = dataset._cache_entry({str(source)!r})
entry.parent.mkdir(parents=True)
os.mkfifo(entry)
print(len(dataset.load_csv({str(source)!r})))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip() == "10"


def test_a_temporary_file_left_by_a_killed_writer_is_swept_up(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    leftover = tmp_path / f".best.pt.{dead.stdout.strip()}.abc123.tmp"
    leftover.write_bytes(b"half a checkpoint")
    ours = tmp_path / f".best.pt.{os.getpid()}.def456.tmp"  # a live writer's: left alone
    ours.write_bytes(b"being written")
    with atomic_write(tmp_path / "best.pt") as f:
        f.write(b"whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["best.pt", ours.name])


def test_an_in_place_edit_that_restores_size_and_time_is_parsed_again(tmp_path):
    images, labels = balanced(1)
    path = write(tmp_path / "c.csv", images, labels)
    dataset.load_csv(path)
    stat = path.stat()
    edited = path.read_bytes().replace(b"\n0,", b"\n1,", 1)  # a label changed in place
    with open(path, "r+b") as f:
        f.write(edited)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_ino) == (stat.st_size, stat.st_ino)
    assert dataset.load_csv(path).labels[0] == 1


@pytest.mark.numerics
def test_training_on_a_single_class_warns(tmp_path, capsys):
    images, labels = balanced(10)
    source = write(tmp_path / "sevens.csv", images[labels == 7], labels[labels == 7])
    train.main(quick(tmp_path, "--train", str(source), "--epochs", "1", "--arch", "basic"))
    assert "sevens.csv: every training row is class 7" in capsys.readouterr().err


def test_pixel_statistics_need_no_float_copy_of_the_images():
    images = np.random.default_rng(0).integers(0, 256, (20000, 28, 28), dtype=np.uint8)
    assert _peak_bytes(lambda: dataset.pixel_stats(images)) < images.nbytes  # float64: 8x it


def test_pixel_statistics_are_exact():
    images = np.random.default_rng(0).integers(0, 256, (50, 28, 28), dtype=np.uint8)
    x = images.astype(np.float64) / 255
    np.testing.assert_allclose(dataset.pixel_stats(images), (x.mean(), x.std(ddof=1)), rtol=1e-12)


def test_metrics_json_of_a_small_run_is_complete(tmp_path):
    """The smallest trainable input runs the whole way: checkpoints, history and metrics."""
    images, labels = balanced(1)
    source = write(tmp_path / "two.csv", images[:2], labels[:2])
    train.main(quick(tmp_path, "--train", str(source), "--epochs", "1", "--arch", "basic"))
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert (metrics["train_images"], metrics["best_epoch"]) == (1, 1)


def test_a_damaged_lzw_tiff_is_one_line_and_libtiff_says_nothing(tmp_path):
    noise = np.random.default_rng(0).integers(0, 255, (64, 64)).astype(np.uint8)
    Image.fromarray(noise).save(tmp_path / "lzw.tif", "TIFF", compression="tiff_lzw")
    raw = bytearray((tmp_path / "lzw.tif").read_bytes())
    raw[40:200] = bytes((b * 7 + 3) % 256 for b in raw[40:200])  # the compressed strip damaged
    (tmp_path / "lzw.tif").write_bytes(bytes(raw))
    script = (
        "import sys, images\n"
        "try:\n    images.preprocess_image(sys.argv[1])\n"
        "except images.UserError as e:\n    print(e)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "lzw.tif")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert "not a readable image" in done.stdout
    assert done.stderr == ""  # libtiff's own "Using code not yet in table." kept off it
