"""Kaggle's MNIST CSVs in, validated uint8 digit tensors out.

CSV layouts and fast parsing with line-and-column errors, the parse cache, finding the data and the
Kaggle download, splits, row hashes and the leak guard's count, the `MNISTCSV` Dataset, the
on-device batch iterator with batched augmentation, test-time augmented views, and the exploration
command.

    python dataset.py explore [CSV]     # rows, class counts, pixel statistics, figures
    python dataset.py download          # oddrationale/mnist-in-csv into data/
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import re
import shutil
import sys
import time
import zipfile
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import IO

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from atomic import WriteError, atomic_write
from cli import CLIParser, UserError, first_line, run_cli, working_root

ROOT = Path(__file__).resolve().parent
DATA_DIR = ROOT / "data"
SAMPLE_DIR = DATA_DIR / "sample"
KAGGLE_DATASET = "oddrationale/mnist-in-csv"
KAGGLE_ZIP = "mnist-in-csv.zip"
KAGGLE_COMPETITION = "digit-recognizer"  # its train.csv / test.csv; submissions of 28,000 rows
COMPETITION_ZIP = f"{KAGGLE_COMPETITION}.zip"
COMPETITION_URL = "https://www.kaggle.com/competitions/{}/rules"

SIDE = 28
PIXELS = SIDE * SIDE
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
DIGIT_CLASSES = tuple(str(d) for d in range(10))
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# Header layouts Kaggle serves, by name: (column names, class names).
_MNIST_IN_CSV = tuple(f"{r}x{c}" for r in range(1, SIDE + 1) for c in range(1, SIDE + 1))
_PIXEL0 = tuple(f"pixel{i}" for i in range(PIXELS))
_PIXEL1 = tuple(f"pixel{i}" for i in range(1, PIXELS + 1))
LAYOUTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "mnist-in-csv": (("label", *_MNIST_IN_CSV), DIGIT_CLASSES),
    "digit-recognizer": (("label", *_PIXEL0), DIGIT_CLASSES),
    "digit-recognizer-test": (_PIXEL0, DIGIT_CLASSES),
    "fashion-mnist": (("label", *_PIXEL1), FASHION_CLASSES),
    "fashion-mnist-unlabelled": (_PIXEL1, FASHION_CLASSES),
}
_BY_HEADER = {columns: name for name, (columns, _) in LAYOUTS.items()}
HEADERLESS = ("headerless", "headerless-unlabelled")  # the layouts of files without a header


def task_of(class_names) -> str:
    """The task a set of class names belongs to, "fashion" (Fashion-MNIST) or "digits": training
    recipes and augmentation policies are chosen per task."""
    return "fashion" if tuple(class_names) == FASHION_CLASSES else "digits"


PARSER_VERSION = 3  # bump when parsing changes, so that old cache entries are ignored
CHUNK_BYTES = 1 << 20
HEAD_BYTES = 1 << 16  # the first line of a CSV of 28x28 images is far shorter
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_NEWLINE, _COMMA, _ZERO, _NINE = 10, 44, 48, 57


@dataclass
class CSVData:
    """One parsed CSV: uint8 images [N,28,28], int64 labels [N] (None when unlabelled)."""

    images: np.ndarray
    labels: np.ndarray | None
    layout: str
    source: str

    @property
    def ids(self) -> np.ndarray:
        """Row ids, 1 for the first data row (Kaggle's ImageId)."""
        return np.arange(1, len(self.images) + 1, dtype=np.int64)

    @property
    def class_names(self) -> tuple[str, ...]:
        return LAYOUTS[self.layout][1] if self.layout in LAYOUTS else DIGIT_CLASSES

    def __len__(self) -> int:
        return len(self.images)


# ---------------------------------------------------------------- reading bytes


def split_member(source: str | Path) -> tuple[Path, str | None]:
    """`archive.zip::member.csv` -> (archive path, member); anything else -> (path, None)."""
    text = str(source)
    if "::" in text:
        path, member = text.split("::", 1)
        return Path(path), member
    return Path(text), None


def _pick_member(zf: zipfile.ZipFile, member: str | None, where: str) -> str:
    csvs = [n for n in zf.namelist() if n.lower().endswith(".csv") and "__MACOSX" not in n]
    if member is not None:
        hits = [n for n in csvs if n == member or Path(n).name == member]
        if len(hits) != 1:
            raise UserError(
                f"{where}: no single member named {member} (it holds: {', '.join(csvs)})"
            )
        return hits[0]
    if not csvs:
        raise UserError(f"{where}: the zip holds no CSV file (give a zip of Kaggle's MNIST CSVs)")
    if len(csvs) > 1:
        raise UserError(
            f"{where}: the zip holds several CSV files: {', '.join(csvs)} "
            f"(name one, as {where}::{Path(csvs[0]).name})"
        )
    return csvs[0]


# What Python's zipfile decompresses (Deflate64, method 9, and the rest it cannot)
ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}


def open_member(zf: zipfile.ZipFile, name: str, where: str) -> IO[bytes]:
    """The member `name` of `zf` opened for reading; an encrypted member or a compression method
    zipfile cannot read is a UserError naming it (`where`: archive::member)."""
    info = zf.getinfo(name)
    if info.flag_bits & 0x1:
        raise UserError(
            f"{where}: the member is encrypted (unzip it with its password and give the CSV)"
        )
    if info.compress_type not in ZIP_METHODS:
        method = "Deflate64" if info.compress_type == 9 else f"method {info.compress_type}"
        raise UserError(
            f"{where}: compressed with {method}, which Python's zipfile cannot read (unzip it "
            "with another tool and give the CSV, or zip it again with plain deflate)"
        )
    return zf.open(info)


def max_csv_bytes() -> int:
    """The most CSV bytes read from one file, decompressed ($MNIST_MAX_CSV_BYTES, else 1 GiB:
    about 400,000 rows, seven times Kaggle's largest MNIST CSV)."""
    text = os.environ.get("MNIST_MAX_CSV_BYTES", "").strip()
    if not text:
        return 1 << 30
    if not text.isdigit() or int(text) < 1:
        raise UserError(
            f"$MNIST_MAX_CSV_BYTES {text[:40]!r}: not a positive whole number of bytes (for "
            "example 2000000000, or unset it for 1 GiB)"
        )
    return int(text)


def _read_bounded(stream: IO[bytes], where: str) -> bytes:
    """All of a (decompressing) stream, refused as soon as its first line or its length goes
    past what a CSV of 28x28 images can be: memory stays bounded whatever the file holds."""
    _check_text(stream.read(HEAD_BYTES), where)
    stream.seek(0)  # cheap for a file, a gzip stream (64 KiB again) or a zip member
    limit = max_csv_bytes()
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise UserError(
            f"{where}: holds more than {limit:,} bytes of CSV, the limit (a decompression bomb, "
            "or a larger data set: set $MNIST_MAX_CSV_BYTES to raise it)"
        )
    return data


def _check_text(head: bytes, where: str) -> None:
    """Refuse, with a hint, the start of a file that cannot be a CSV of 28x28 images."""
    odd, even = head[1:400:2].count(0), head[0:400:2].count(0)  # ASCII in UTF-16: every other
    if head[:2] in (b"\xff\xfe", b"\xfe\xff") or abs(odd - even) > len(head[:400]) // 4:
        raise UserError(f"{where}: UTF-16 text (re-save it as UTF-8, which CSV readers expect)")
    if b"\0" in head:
        raise UserError(f"{where}: binary data at byte {head.index(0):,}, not a CSV text file")
    if len(head) == HEAD_BYTES and b"\n" not in head and b"\r" not in head:
        raise UserError(
            f"{where}:1: no line end in the first {HEAD_BYTES:,} bytes (lines of a CSV of 28x28 "
            "images are a few thousand characters)"
        )


def read_source_bytes(source: str | Path) -> tuple[bytes, str]:
    """Raw CSV bytes of a .csv, .csv.gz or .zip(::member) file, and the name used in messages;
    at most max_csv_bytes() of them, checked while decompressing."""
    path, member = split_member(source)
    where = str(path)
    if not path.exists():
        if path.is_symlink():
            raise UserError(f"{where}: a symbolic link to nothing (broken, or a loop of links)")
        raise UserError(f"{where}: no such file (check the path, or run: {manual_download()})")
    if not path.is_file():
        raise UserError(f"{where}: is a directory, pipe or device, not a file (give a CSV file)")
    try:
        if path.suffix.lower() == ".zip" or (member and zipfile.is_zipfile(path)):
            with zipfile.ZipFile(path) as zf:
                name = _pick_member(zf, member, where)
                with open_member(zf, name, f"{where}::{name}") as stream:
                    return _read_bounded(stream, f"{where}::{name}"), f"{where}::{name}"
        with open(path, "rb") as f:
            compressed = path.suffix.lower() == ".gz" or f.read(2) == b"\x1f\x8b"
            f.seek(0)
            if compressed:
                with gzip.open(f) as stream:
                    return _read_bounded(stream, where), where
            return _read_bounded(f, where), where
    except (zipfile.BadZipFile, gzip.BadGzipFile, zlib.error, EOFError) as e:
        kind = "zip" if path.suffix.lower() == ".zip" else "gzip"
        raise UserError(f"{where}: corrupt {kind} file: {e} (download it again)") from None
    except PermissionError:
        raise UserError(f"{where}: permission denied (make the file readable)") from None


# ---------------------------------------------------------------- parsing


def _is_number(cell: str) -> bool:
    return bool(_NUMBER.fullmatch(cell.strip()))


def _detect_layout(header_line: str, where: str) -> tuple[str, int, bool, tuple[str, ...] | None]:
    """(layout name, column count, labelled, header) from the first line."""
    cells = [cell.strip().strip('"').lower() for cell in header_line.split(",")]
    if all(_is_number(cell) for cell in cells):
        if len(cells) == PIXELS + 1:
            return HEADERLESS[0], len(cells), True, None
        if len(cells) == PIXELS:
            return HEADERLESS[1], len(cells), False, None
        raise UserError(
            f"{where}:1: {len(cells)} columns "
            f"(a headerless CSV needs {PIXELS + 1}: label then {PIXELS} pixels, or {PIXELS} pixels)"
        )
    name = _BY_HEADER.get(tuple(cells))
    if name is None:
        shown = ",".join(cell[:20] for cell in cells[:3]) + (",..." if len(cells) > 3 else "")
        raise UserError(
            f"{where}:1: unknown header {shown} with {len(cells)} columns (expected "
            "label,1x1..28x28 or label,pixel0..pixel783 or label,pixel1..pixel784, "
            "the label optional, or no header)"
        )
    columns = LAYOUTS[name][0]
    return name, len(columns), columns[0] == "label", columns


def _parse_chunk_fast(chunk: np.ndarray, ncols: int, labelled: bool) -> np.ndarray | None:
    """Rows of plain `d,dd,ddd\\n` cells as uint8 [rows, ncols], or None if anything is unusual."""
    if chunk.max() > _NINE:
        return None
    seps = np.flatnonzero(chunk < _ZERO)  # every comma and newline (and anything else unusual)
    ends = np.flatnonzero(chunk == _NEWLINE)
    rows = len(ends)
    if len(seps) != rows * ncols or np.count_nonzero(chunk == _COMMA) != len(seps) - rows:
        return None
    if not np.array_equal(seps[ncols - 1 :: ncols], ends):
        return None
    width = np.empty_like(seps)  # cell length + 1
    width[0] = seps[0] + 1
    np.subtract(seps[1:], seps[:-1], out=width[1:])
    if width.min() < 2 or width.max() > 4:
        return None
    # Digits at 1, 2 and 3 places before each separator; the masks drop those of the cell before.
    zero = np.uint8(_ZERO)
    values = (chunk[seps - 1] - zero).astype(np.uint16)
    values += (chunk[seps - 2] - zero) * (width >= 3).astype(np.uint16) * np.uint16(10)
    values += (chunk[seps - 3] - zero).astype(np.uint16) * (width == 4) * np.uint16(100)
    values = values.reshape(rows, ncols)
    if values.max() > 255 or (labelled and values[:, 0].max() > 9):
        return None
    return values.astype(np.uint8)


ASCII_SPACE = " \t\n\r\v\f"


def _cell_problem(cell: str, is_label: bool) -> str | None:
    """What is wrong with one cell, or None."""
    text = cell.strip(ASCII_SPACE)  # float() strips these, but not Unicode's (as \x1c)
    if not text:
        return "empty cell"
    if not _NUMBER.fullmatch(text):
        return f"{text[:20]!r} is not a number"
    value = float(text)
    kind, top = ("label", 9) if is_label else ("pixel", 255)
    shown = text if len(text) <= 20 else f"{text[:20]}... ({len(text)} characters)"
    if not (math.isfinite(value) and 0 <= value <= top):
        return f"{kind} {shown} is outside 0..{top}"
    if not value.is_integer():
        scaled = " (pixels scaled to 0..1? multiply them by 255)" if 0 < value < 1 else ""
        return f"{kind} {shown} is not a whole number{scaled}"
    return None


def _parse_chunk_exact(
    text: str, line_number: int, ncols: int, labelled: bool, where: str, header: tuple | None
) -> np.ndarray:
    """Slow, exact parse of `\\n`-terminated rows; raises UserError at the first bad cell."""
    lines = text.split("\n")[:-1]
    out = np.empty((len(lines), ncols), np.uint8)
    need = f"a label and {PIXELS} pixels" if labelled else f"{PIXELS} pixels"
    for k, line in enumerate(lines):
        at = f"{where}:{line_number + k}"
        cells = line.split(",")
        if len(cells) != ncols:
            what = "empty row" if not line.strip() else f"{len(cells)} columns, expected {ncols}"
            raise UserError(f"{at}: {what} (every row needs {need})")
        try:  # float() reads 1_0 as 10 (Python's syntax, not a CSV number): checked below
            values = np.array(cells, dtype=np.float64)
            ok = (
                "_" not in line and np.isfinite(values).all() and (values == np.round(values)).all()
            )
            ok = ok and values.min() >= 0 and values.max() <= 255
            ok = ok and not (labelled and values[0] > 9)
        except ValueError:
            ok = False
        if not ok:
            for j, cell in enumerate(cells):
                problem = _cell_problem(cell, labelled and j == 0)
                if problem:
                    name = header[j] if header else ("label" if labelled and j == 0 else "pixel")
                    raise UserError(
                        f"{at}: column {j + 1} ({name}): {problem} "
                        "(labels are whole numbers 0..9, pixels whole numbers 0..255)"
                    )
            values = np.array([float(cell) for cell in cells])
        out[k] = values
    return out


def _tidy(data: bytes, where: str) -> bytes:
    """The CSV without a byte order mark or quotes, with \\n line ends (ending in exactly one)
    and commas between cells (a first line without commas may use semicolons or tabs)."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if b"\r" in data:  # Windows' \r\n, and the \r alone of old Mac files
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if b'"' in data:  # numbers and names in quotes: nothing in these files needs them
        data = data.replace(b'"', b"")
    first = data[: data.find(b"\n")]
    if b"," not in first:
        for separator in (b";", b"\t"):
            if separator in first:
                data = data.replace(separator, b",")
                break
    if re.fullmatch(rb"\s*", data[:65536]) and not data.strip():
        raise UserError(f"{where}: empty file (expected a header or rows of {PIXELS} pixels)")
    if not data.endswith(b"\n"):
        return data + b"\n"
    return data.rstrip(b"\n") + b"\n" if data.endswith(b"\n\n") else data


def _has_index_column(header_line: str) -> bool:
    """Whether a header is a known layout after an unnamed first column (pandas' index)."""
    first, _, rest = header_line.lower().partition(",")
    cells = tuple(cell.strip() for cell in rest.split(","))
    return first.strip() in ("", "unnamed: 0") and cells in _BY_HEADER


def _without_index_column(data: bytes, where: str) -> bytes:
    """The CSV without its unnamed first column, which must be pandas' index: 0, 1, ..., N-1."""
    header, *rows = data.split(b"\n")[:-1]
    cut = [row.partition(b",") for row in rows]
    if [index for index, _, _ in cut] != [str(i).encode() for i in range(len(rows))]:
        raise UserError(
            f"{where}: column 1 has no name and is not 0, 1, 2, ... (if it is pandas' index, "
            "save the file with index=False)"
        )
    return b"\n".join([header.partition(b",")[2], *(cells for _, _, cells in cut)]) + b"\n"


def _chunk_bounds(data: bytes, start: int) -> list[tuple[int, int]]:
    """(start, end) of chunks of about CHUNK_BYTES that end at a line end."""
    bounds, lo = [], start
    while lo < len(data):
        hi = data.index(b"\n", min(lo + CHUNK_BYTES, len(data) - 1)) + 1
        bounds.append((lo, hi))
        lo = hi
    return bounds


def parse_csv_bytes(data: bytes, where: str) -> CSVData:
    """Validate and parse a whole CSV held in memory."""
    data = _tidy(data, where)
    first_end = data.index(b"\n")
    first = data[:first_end].decode("utf-8", errors="replace")
    if _has_index_column(first):
        data = _without_index_column(data, where)
        first_end = data.index(b"\n")
        first = data[:first_end].decode("utf-8", errors="replace")
    layout, ncols, labelled, header = _detect_layout(first, where)
    start = 0 if header is None else first_end + 1
    if start >= len(data):
        raise UserError(f"{where}: header only, no data rows (the file looks cut short)")
    buf = np.frombuffer(data, np.uint8)

    def parse(bound: tuple[int, int]) -> np.ndarray:
        lo, hi = bound
        rows = _parse_chunk_fast(buf[lo:hi], ncols, labelled)
        if rows is None:
            text = data[lo:hi].decode("utf-8", errors="replace")
            line = data.count(b"\n", 0, lo) + 1
            rows = _parse_chunk_exact(text, line, ncols, labelled, where, header)
        return rows

    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
        tables = list(pool.map(parse, _chunk_bounds(data, start)))
    images = np.empty((sum(map(len, tables)), PIXELS), np.uint8)
    labels = np.empty(len(images), np.int64) if labelled else None
    row = 0
    for table in tables:
        images[row : row + len(table)] = table[:, int(labelled) :]
        if labels is not None:
            labels[row : row + len(table)] = table[:, 0]
        row += len(table)
    return CSVData(images.reshape(-1, SIDE, SIDE), labels, layout, where)


def read_csv(source: str | Path) -> CSVData:
    """Read and validate one CSV (.csv, .csv.gz, .zip or archive.zip::member), no cache."""
    data, where = read_source_bytes(source)
    return parse_csv_bytes(data, where)


# ---------------------------------------------------------------- parse cache

ANNOUNCED_BYTES = 20_000_000  # a first parse of this much CSV text says so before and after


def read_announced(source: str | Path) -> CSVData:
    """`read_csv`, with a line on stderr before and after when the CSV text (decompressed) is
    ANNOUNCED_BYTES or more (seconds of parsing), so that a log shows what the wait is."""
    data, where = read_source_bytes(source)
    if len(data) < ANNOUNCED_BYTES:
        return parse_csv_bytes(data, where)
    print(
        f"parsing {where} ({len(data) / 1e6:,.0f} MB of CSV) into the parse cache, {cache_dir()}",
        file=sys.stderr,
        flush=True,
    )
    started = time.perf_counter()
    parsed = parse_csv_bytes(data, where)
    print(f"parsed {len(parsed):,} rows in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    return parsed


def cache_dir() -> Path:
    """Where parsed CSVs are kept: $MNIST_CACHE_DIR (when set and not empty), else
    data/.cache."""
    return Path(os.environ.get("MNIST_CACHE_DIR") or DATA_DIR / ".cache")


def _content_sample(path: Path, size: int) -> str:
    """A hash of the file's first and last MiB: an edit that keeps size, time and inode (an
    in-place rewrite that restores the modification time) still changes the cache key."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        digest.update(f.read(1 << 20))
    return digest.hexdigest()


def _cache_entry(source: str | Path) -> tuple[Path, str]:
    """(cache file, key); the key changes whenever the CSV's bytes may have changed."""
    path, member = split_member(source)
    st = path.stat()
    ident = f"{path.resolve()}::{member}"
    stamp = f"{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{_content_sample(path, st.st_size)}"
    key = f"v{PARSER_VERSION}|{ident}|{stamp}"
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", path.name)
    digest = hashlib.sha1(ident.encode()).hexdigest()[:12]
    return cache_dir() / f"{stem}-{digest}.npz", key


def _sound(cached) -> bool:
    """Whether a cache entry holds what a parse gives (uint8 images [N, 28, 28], labels 0..9 of
    each row or none, a known layout): an entry edited by hand is parsed again, not trusted."""
    images, labels = cached["images"], cached["labels"]
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (SIDE, SIDE):
        return False
    if str(cached["layout"]) not in {*LAYOUTS, *HEADERLESS}:
        return False
    if not bool(cached["labelled"]):
        return True
    in_range = len(labels) == 0 or (labels.min() >= 0 and labels.max() <= 9)
    return labels.dtype == np.int64 and labels.shape == (len(images),) and bool(in_range)


def load_csv(source: str | Path, cache: bool = True) -> CSVData:
    """`read_csv` through the parse cache: a repeat load of an unchanged file skips parsing."""
    if not cache:
        return read_csv(source)
    path, _ = split_member(source)
    if not path.is_file():
        return read_csv(source)  # raises the right error
    entry, key = _cache_entry(source)
    try:
        if not entry.is_file():  # absent, or a FIFO or device that np.load would block on
            raise FileNotFoundError(entry)
        with np.load(entry, allow_pickle=False) as cached:
            if str(cached["key"]) == key and _sound(cached):
                labels = cached["labels"] if bool(cached["labelled"]) else None
                _, member = split_member(str(cached["source"]))  # the zip member it holds
                name = str(path) if member is None else f"{path}::{member}"  # as the caller says
                return CSVData(cached["images"], labels, str(cached["layout"]), name)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError):
        pass
    parsed = read_announced(source)
    labels = parsed.labels if parsed.labels is not None else np.zeros(0, np.int64)
    try:
        with atomic_write(entry) as f:
            np.savez(
                f,
                key=key,
                images=parsed.images,
                labels=labels,
                labelled=parsed.labels is not None,
                layout=parsed.layout,
                source=parsed.source,
            )
    except (OSError, WriteError):
        pass  # a read-only project directory, or a full disk, only costs the cache
    return parsed


# ---------------------------------------------------------------- finding and downloading


def kaggle_input_root() -> Path:
    """Kaggle's read-only input directory ($KAGGLE_INPUT_ROOT overrides /kaggle/input)."""
    return Path(os.environ.get("KAGGLE_INPUT_ROOT", "/kaggle/input"))


def _find_under(root: Path, name: str, depth: int = 4) -> Path | None:
    """The shallowest file called `name` at most `depth` folders below `root`. Kaggle mounts a
    dataset at <root>/datasets/<owner>/<slug>/, a competition at <root>/competitions/<slug>/,
    and in older kernels either at <root>/<slug>/."""
    for level in range(depth + 1):
        hits = sorted(root.glob("/".join(["*"] * level + [name])))
        if hits:
            return hits[0]
    return None


def data_dir_candidates(split: str) -> list[str]:
    """Where in data/ a `split` CSV may lie, best first: MNIST in CSV as a file, gzipped or in
    Kaggle's zip, then Digit Recognizer's train.csv / test.csv, unzipped or in their zip."""
    mnist = [str(DATA_DIR / f"mnist_{split}.csv"), str(DATA_DIR / f"mnist_{split}.csv.gz")]
    return [
        *mnist,
        f"{DATA_DIR / KAGGLE_ZIP}::mnist_{split}.csv",
        str(DATA_DIR / f"{split}.csv"),
        f"{DATA_DIR / COMPETITION_ZIP}::{split}.csv",
    ]


def find_data(split: str, announce: bool = True) -> str:
    """The CSV for `split` ('train' or 'test'): Kaggle input, then data/, then the sample."""
    names = (f"mnist_{split}.csv", f"mnist_{split}.csv.gz")
    kaggle_root = kaggle_input_root()
    if kaggle_root.is_dir():
        for name in (*names, f"{split}.csv"):
            found = _find_under(kaggle_root, name)
            if found:
                return str(found)
    for candidate in data_dir_candidates(split):
        if split_member(candidate)[0].is_file():
            return candidate
    sample = SAMPLE_DIR / f"mnist_{split}.csv.gz"
    if not sample.is_file():  # a copy of the code without the sample, as in a Kaggle kernel
        raise UserError(
            f"no {split} CSV found in {kaggle_root} or {DATA_DIR} (attach the dataset "
            f"{KAGGLE_DATASET} to the kernel, or download it: {manual_download()})"
        )
    if announce:
        print(
            f"note: using the bundled sample {sample.relative_to(ROOT)} (real digits, small); "
            "for the full set run: python dataset.py download",
            file=sys.stderr,
        )
    return str(sample)


def manual_download(dest: Path = DATA_DIR, competition: str | None = None) -> str:
    """The kaggle command that downloads by hand what `download` fetches into `dest`."""
    where = os.path.relpath(dest) if dest.is_relative_to(Path.cwd()) else dest
    if competition:
        unzip = f"unzip {Path(where, competition)}.zip -d {where}"
        return f"kaggle competitions download -c {competition} -p {where} && {unzip}"
    return f"kaggle datasets download -d {KAGGLE_DATASET} -p {where} --unzip"


def _kaggle_api(manual: str):
    """The authenticated kaggle client. Without credentials the package prints a page of help and
    raises SystemExit (its own import swallows that), so authenticate here, quietly."""
    chatter = io.StringIO()
    try:
        with redirect_stdout(chatter), redirect_stderr(chatter):
            from kaggle.api.kaggle_api_extended import KaggleApi

            api = KaggleApi()
            api.authenticate()
            return api
    except (SystemExit, Exception):
        raise UserError(
            "kaggle: no usable Kaggle credentials (create a token at "
            f"https://www.kaggle.com/settings/api, or download by hand: {manual})"
        ) from None


def download(
    dest: Path = DATA_DIR, unzip: bool = True, api=None, competition: str | None = None
) -> list[Path]:
    """Fetch oddrationale/mnist-in-csv (or a competition's files) into `dest` with the kaggle
    client; return the CSVs and zips it left there."""
    api = api or _kaggle_api(manual_download(dest, competition))
    dest.mkdir(parents=True, exist_ok=True)
    what = competition or KAGGLE_DATASET
    try:
        if competition:
            api.competition_download_files(competition, path=str(dest), quiet=False)
        else:
            api.dataset_download_files(KAGGLE_DATASET, path=str(dest), unzip=unzip, quiet=False)
    except Exception as e:
        rules = (
            f"accept its rules at {COMPETITION_URL.format(competition)}, " if competition else ""
        )
        raise UserError(
            f"kaggle: download of {what} failed: {first_line(e)} (check the network, "
            f"{rules}or download by hand: {manual_download(dest, competition)})"
        ) from None
    archive = dest / f"{competition}.zip"
    if competition and unzip and archive.is_file():
        extract_csvs(archive, dest)
        archive.unlink()
    return sorted(p for p in dest.glob("*.csv") if p.name != "sample_submission.csv") + sorted(
        dest.glob("*.zip")
    )


def extract_csvs(archive: Path, dest: Path) -> None:
    """Each CSV at the top of `archive` written atomically into `dest` (members in folders,
    links and other files are left in the zip)."""
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            name = info.filename
            if "/" in name or "\\" in name or not name.endswith(".csv") or info.is_dir():
                continue
            with (
                open_member(zf, name, f"{archive}::{name}") as member,
                atomic_write(dest / name, "wb") as out,
            ):
                shutil.copyfileobj(member, out)


# ---------------------------------------------------------------- splits and statistics


MIN_TRAIN_ROWS = 2  # one to train on, one to validate


def check_val_split(val_fraction: float) -> None:
    """Refuse a validation share that leaves no rows on one side, in one line."""
    if not 0 < val_fraction < 1:
        raise UserError(f"--val-split {val_fraction}: must be between 0 and 1 (for example 0.1)")


def stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, validation) indices with each class split in the same proportion, both
    non-empty: every class keeps at least one training row, and when rounding leaves validation
    empty it takes one row of the largest class. Needs MIN_TRAIN_ROWS labels."""
    check_val_split(val_fraction)
    if len(labels) < MIN_TRAIN_ROWS:
        raise UserError(f"{len(labels)} labelled row: training needs at least {MIN_TRAIN_ROWS}")
    rng = np.random.default_rng(seed)
    shuffled = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        rng.shuffle(rows)
        shuffled.append(rows)
    val = [rows[: min(round(len(rows) * val_fraction), len(rows) - 1)] for rows in shuffled]
    val_idx = np.sort(np.concatenate(val))
    if not len(val_idx):
        val_idx = max(shuffled, key=len)[:1]
    return np.setdiff1d(np.arange(len(labels)), val_idx), val_idx


@dataclass
class Splits:
    """A run's data: the training CSV as parsed, its rows split into training and validation,
    and the labelled test set when there is one."""

    parsed: CSVData
    train: CSVData
    val: CSVData
    test: CSVData | None

    @property
    def task(self) -> str:
        return task_of(self.parsed.class_names)

    def seen_rows(self) -> dict[str, torch.Tensor]:
        """The leak guard's fingerprint of the rows the run learns from: the pixel hashes of the
        training and validation rows (8 bytes a row), which predict.py compares its input with."""
        return {
            name: torch.from_numpy(np.unique(row_hashes(part.images)).view(np.int64))
            for name, part in (("train", self.train), ("val", self.val))
        }


def load_splits(
    train: str | None, test: str | None, max_rows: int | None, val_split: float, seed: int
) -> Splits:
    """The training CSV (given or found), its first `max_rows` rows split stratified (seeded),
    and the test CSV (given, or found when the training CSV was) when it is labelled."""
    train_source = train or find_data("train")
    test_source = test
    if test_source is None and train is None:
        test_source = find_data("test", announce=False)
    parsed = load_csv(train_source)
    if parsed.labels is None:
        raise UserError(f"{parsed.source}: has no label column (training needs labelled rows)")
    rows = slice(max_rows)
    images, labels = parsed.images[rows], parsed.labels[rows]
    if len(labels) < MIN_TRAIN_ROWS:
        raise UserError(
            f"{parsed.source}: {len(labels)} labelled row; training needs at least "
            f"{MIN_TRAIN_ROWS} (one to train on, one to validate)"
        )
    if len(np.unique(labels)) < 2:
        name = parsed.class_names[labels[0]]
        print(
            f"warning: {parsed.source}: every training row is class {name}, so the model can "
            f"only learn to answer {name}",
            file=sys.stderr,
        )
    train_rows, val_rows = stratified_split(labels, val_split, seed)
    test_data = load_csv(test_source) if test_source else None

    def part(which: np.ndarray) -> CSVData:
        return CSVData(images[which], labels[which], parsed.layout, parsed.source)

    return Splits(parsed, part(train_rows), part(val_rows), scored_test(test_data, test))


def scored_test(test_data: CSVData | None, given: str | None) -> CSVData | None:
    """The test CSV when it has labels to score; an unlabelled one given as --test is named
    in a note, not passed over in silence (one found by itself, as Digit Recognizer's
    test.csv, is meant for predict.py)."""
    if test_data is not None and test_data.labels is None:
        if given is not None:
            print(
                f"note: --test {test_data.source}: no labels, so it is not scored (predict it "
                f"with: python predict.py --input {test_data.source})",
                file=sys.stderr,
            )
        return None
    return test_data


def row_hashes(images: np.ndarray) -> np.ndarray:
    """A 64-bit BLAKE2b hash of each image's pixels [N] (uint64): two rows share one exactly when
    they are the same image (but with odds of about N / 2**64). The leak guard compares these."""
    rows = np.ascontiguousarray(images, dtype=np.uint8).reshape(len(images), -1)
    digests = b"".join(hashlib.blake2b(row, digest_size=8).digest() for row in rows)
    return np.frombuffer(digests, dtype="<u8").copy()


def count_seen(fingerprint: dict[str, np.ndarray] | None, images: np.ndarray) -> dict | None:
    """The leak guard: how many of `images` the models trained on or validated on, matched by
    pixel hashes against `fingerprint` (predict.Ensemble.seen_fingerprint); None without one."""
    if fingerprint is None:
        return None
    hashes = row_hashes(images).view(np.int64)
    trained = np.isin(hashes, fingerprint["train"])
    seen = trained | np.isin(hashes, fingerprint["val"])
    return {"rows": len(images), "seen": int(seen.sum()), "trained_on": int(trained.sum())}


def pixel_stats(images: np.ndarray) -> tuple[float, float]:
    """Mean and (sample) standard deviation of the pixels, scaled to 0..1: exact, from a
    histogram of the uint8 values counted a few thousand images at a time (no float copy); the
    deviation at least 1/255."""
    counts = np.zeros(256, np.int64)
    flat = images.reshape(len(images), -1)
    for start in range(0, len(flat), 1024):
        counts += np.bincount(flat[start : start + 1024].ravel(), minlength=256)
    values = np.arange(256, dtype=object)
    n, total = int(counts.sum()), int((counts.astype(object) * values).sum())
    squares = int((counts.astype(object) * values * values).sum())
    mean = Fraction(total, n * 255)
    variance = Fraction(n * squares - total * total, n * (n - 1) * 255 * 255)
    return float(mean), max(math.sqrt(variance), 1 / 255)  # blank images would divide by 0


# ---------------------------------------------------------------- tensors for training


class MNISTCSV(Dataset):
    """A standard map-style Dataset: item i is (normalized float [1,28,28], label), or the image
    alone for unlabelled data."""

    def __init__(
        self, source: str | Path | CSVData, mean: float = MNIST_MEAN, std: float = MNIST_STD
    ) -> None:
        self.data = source if isinstance(source, CSVData) else load_csv(source)
        self.images = torch.from_numpy(self.data.images)
        self.labels = None if self.data.labels is None else torch.from_numpy(self.data.labels)
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        x = (self.images[i].float().div(255).sub(self.mean).div(self.std)).unsqueeze(0)
        return x if self.labels is None else (x, int(self.labels[i]))


@dataclass(frozen=True)
class Normalize:
    """How a network takes its input: (x - mean) / std, in channels_last memory format or not."""

    mean: float = MNIST_MEAN
    std: float = MNIST_STD
    channels_last: bool = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """A normalized copy of a float batch [B,1,H,W] scaled to 0..1."""
        x = x.sub(self.mean).div_(self.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def warp(x: torch.Tensor, theta: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Resample a float batch [B,1,H,W] through affine maps theta [B,2,3] (output to input
    coordinates, -1..1 across the image), moved further by `offsets` [B,H,W,2] (in those
    coordinates) where given, bilinearly, filling with 0 outside."""
    n, _, h, w = x.shape
    grid = (pixel_coordinates(h, w, x) @ theta.to(x.dtype).transpose(1, 2)).view(n, h, w, 2)
    if offsets is not None:
        grid = grid + offsets.to(x.dtype)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def pixel_coordinates(h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """Each pixel's (x, y, 1) in warp's coordinates [H*W, 3], row by row, on `like`'s device and
    dtype: F.affine_grid's grid for one image, which the affine maps of a whole batch then
    multiply at once (a quarter of F.affine_grid's time for a batch on a CPU)."""
    identity = torch.eye(2, 3, dtype=like.dtype, device=like.device)[None]
    grid = F.affine_grid(identity, [1, 1, h, w], align_corners=False).view(h * w, 2)
    return torch.cat((grid, torch.ones_like(grid[:, :1])), 1)


ELASTIC_POINTS = 4  # control points a side of the elastic displacement field (9 pixels apart)


TTA_SHIFT = 1  # pixels
TTA_DEGREES = 8.0


def tta_views(x: torch.Tensor, mirror: bool = False) -> list[torch.Tensor]:
    """The batch [B,1,H,W] (background 0) as it is, shifted a pixel four ways, and rotated both
    ways: seven views whose predictions are averaged. For models trained on mirrored images the
    mirror image replaces the two rotations."""
    s, h, w = TTA_SHIFT, x.shape[-2], x.shape[-1]
    padded = F.pad(x, (s, s, s, s))
    shifts = [
        padded[..., s - dy : s - dy + h, s - dx : s - dx + w]
        for dx, dy in ((s, 0), (-s, 0), (0, s), (0, -s))
    ]
    if mirror:
        return [x, *shifts, x.flip(-1)]
    return [x, *shifts, rotate(x, TTA_DEGREES), rotate(x, -TTA_DEGREES)]


def rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate a batch [B,1,H,W] about its centre, filling with 0."""
    a = math.radians(degrees)
    theta = torch.tensor(
        [[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]],
        dtype=x.dtype,
        device=x.device,
    ).expand(len(x), 2, 3)
    return warp(x, theta)


@dataclass
class Augment:
    """Random small affine distortions, one per image, as batched tensor ops on any device;
    with `elastic`, also a smooth random displacement of every pixel (Simard et al. 2003's
    elastic distortion, its field drawn at ELASTIC_POINTS x ELASTIC_POINTS control points and
    interpolated bicubically instead of smoothing per-pixel noise)."""

    degrees: float = 10.0
    translate: float = 0.1  # fraction of the side
    scale: float = 0.1  # +- fraction
    shear: float = 10.0  # degrees
    hflip: bool = False  # mirror half the images left to right
    elastic: float = 0.0  # pixels: the largest displacement of a control point

    @classmethod
    def for_classes(cls, class_names) -> Augment:
        """The policy for a task: digits get small affine distortions; Fashion-MNIST's garments
        are mirrored and shifted, but not rotated or sheared (that cost `basic` 2 points)."""
        if task_of(class_names) == "fashion":
            return cls(degrees=0.0, translate=0.1, scale=0.0, shear=0.0, hflip=True)
        return cls()

    def describe(self) -> str:
        parts = [
            (self.hflip, "mirroring"),
            (self.degrees, f"rotation up to {self.degrees:g} degrees"),
            (self.translate, f"shift up to {self.translate:.0%}"),
            (self.scale, f"scale up to {self.scale:.0%}"),
            (self.shear, f"shear up to {self.shear:g} degrees"),
            (self.elastic, f"elastic up to {self.elastic:g} pixels"),
        ]
        return ", ".join(text for on, text in parts if on) or "none"

    def scaled(self, strength: float) -> Augment:
        """This policy with every affine distortion's range multiplied by `strength` (mirroring
        and the elastic distortion kept)."""
        ranges = ("degrees", "translate", "scale", "shear")
        return replace(self, **{name: getattr(self, name) * strength for name in ranges})

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Distort a float batch [B,1,H,W] whose background is 0."""
        return self.apply(x, self.draw(x.shape[0], generator))

    @property
    def affine_columns(self) -> int:
        return 6 if self.hflip else 5  # digits keep the random stream they were tuned with

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """The random numbers of `n` images' distortions, in [-1, 1): the affine map's, then
        the elastic field's control points (x and y), if any."""
        columns = self.affine_columns + (2 * ELASTIC_POINTS**2 if self.elastic else 0)
        return torch.rand(n, columns, generator=generator, device=generator.device) * 2 - 1

    def apply(self, x: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """Distort a float batch [B,1,H,W] by the distortions `draws` (one row an image)."""
        draws = draws.to(x.device)
        angle = draws[:, 0] * math.radians(self.degrees)
        shear = draws[:, 1] * math.radians(self.shear)
        scale = 1 + draws[:, 2] * self.scale
        shift_x, shift_y = draws[:, 3] * 2 * self.translate, draws[:, 4] * 2 * self.translate
        cos, sin, tan = torch.cos(angle), torch.sin(angle), torch.tan(shear)
        theta = torch.stack(
            (
                torch.stack((cos * scale, (cos * tan - sin) * scale, shift_x), 1),
                torch.stack((sin * scale, (sin * tan + cos) * scale, shift_y), 1),
            ),
            1,
        )
        if self.hflip:  # x_in = -x_out before the affine map: a mirror image
            theta[:, :, 0] *= torch.where(draws[:, 5] < 0, -1.0, 1.0)[:, None]
        return warp(x, theta, self.elastic_offsets(x.shape, draws[:, self.affine_columns :]))

    def elastic_offsets(self, shape: torch.Size, draws: torch.Tensor) -> torch.Tensor | None:
        """The elastic displacement [B,H,W,2] of a batch of `shape` (warp's coordinates: a
        pixel is 2/W across) from its control points' draws, or None without one."""
        if not self.elastic:
            return None
        n, _, h, w = shape
        points = draws.reshape(n, 2, ELASTIC_POINTS, ELASTIC_POINTS)
        field = F.interpolate(points, size=(h, w), mode="bicubic", align_corners=True)
        per_pixel = torch.tensor([2 / w, 2 / h], dtype=field.dtype, device=field.device)
        return field.permute(0, 2, 3, 1) * (self.elastic * per_pixel)


class DeviceBatches:
    """A whole split kept on one device as uint8, sliced into float batches with no per-image
    Python work, normalized by `normalize` (None: left at 0..1). With `shuffle_seed` it is a
    training pass: a new order every pass (from that seed), each batch augmented when `augment`
    is given, and a last partial batch dropped when there are several. Without it, every row in
    order. `share` makes it one DistributedDataParallel rank's."""

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor | None,
        batch_size: int,
        device: torch.device | str = "cpu",
        normalize: Normalize | None = Normalize(),
        shuffle_seed: int | None = None,
        augment: Augment | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.rank, self.world = 0, 1
        self.x = torch.as_tensor(images).to(self.device)
        self.y = None if labels is None else torch.as_tensor(labels).to(self.device)
        self.batch_size, self.normalize, self.augment = batch_size, normalize, augment
        self.shuffle = shuffle_seed is not None
        self.drop_last = self.shuffle and len(self.x) > batch_size
        self.generator = torch.Generator().manual_seed(shuffle_seed or 0)

    def share(self, rank: int, world: int) -> DeviceBatches:
        """Yield only every world-th row of each batch from the rank-th on, as a rank of
        DistributedDataParallel trains: the ranks draw the same order and distortions and each
        takes its share. Returns itself."""
        self.rank, self.world = rank, world
        return self

    def __len__(self) -> int:
        n, b = len(self.x), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        n = len(self.x)
        order = (
            torch.randperm(n, generator=self.generator).to(self.device) if self.shuffle else None
        )
        for k in range(len(self)):
            window = slice(k * self.batch_size, min(n, (k + 1) * self.batch_size))
            mine = slice(window.start + self.rank, window.stop, self.world)
            if order is not None:
                mine = order[window][self.rank :: self.world]
            xb = self.x[mine].unsqueeze(1).float().div_(255)
            if self.augment is not None:
                draws = self.augment.draw(window.stop - window.start, self.generator)
                xb = self.augment.apply(xb, draws[self.rank :: self.world])
            if self.normalize is not None:
                xb = self.normalize(xb)
            yield xb, (None if self.y is None else self.y[mine])


# ---------------------------------------------------------------- exploration CLI


def explore(source: str, out_dir: Path, draw: bool = True) -> dict:
    """Print rows, class counts and shares and pixel statistics; draw the exploration figures."""
    data = load_csv(source)
    mean, std = pixel_stats(data.images)
    summary = {"source": data.source, "layout": data.layout, "rows": len(data)}
    print(f"{data.source}: {len(data):,} rows, layout {data.layout}")
    print(
        f"pixels: mean {mean * 255:.2f} std {std * 255:.2f} (0..255), {mean:.4f} / {std:.4f} (0..1)"
    )
    summary.update(pixel_mean=mean, pixel_std=std)
    if data.labels is not None:
        counts = np.bincount(data.labels, minlength=10)
        print(f"{'class':>14} {'count':>7} {'share':>6}")
        for name, n in zip(data.class_names, counts, strict=True):
            print(f"{name:>14} {n:>7,} {n / len(data):>6.1%}")
        summary["class_counts"] = counts.tolist()
    if draw:
        import plots

        written = plots.exploration_figures(data, Augment.for_classes(data.class_names), out_dir)
        print("wrote " + ", ".join(str(p) for p in written))
    return summary


def build_parser() -> CLIParser:
    """dataset.py's command line: explore or download."""
    parser = CLIParser(description="Explore or download Kaggle's MNIST CSVs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CLIParser)
    ex = sub.add_parser("explore", help="print rows, class counts, pixel statistics; draw figures")
    ex.add_argument("csv", nargs="?", help="CSV, .csv.gz or .zip[::member]; default: found train")
    ex.add_argument(
        "--out-dir", type=Path, default=working_root() / "outputs", help="where figures go"
    )
    ex.add_argument("--no-plots", action="store_true", help="print statistics only")
    dl = sub.add_parser("download", help=f"fetch {KAGGLE_DATASET} with the kaggle client")
    dl.add_argument("--dest", type=Path, default=DATA_DIR, help="download directory")
    dl.add_argument("--no-unzip", action="store_true", help="keep the zip as it is")
    dl.add_argument(
        "--competition",
        metavar="SLUG",
        help=f"a competition's files instead, such as {KAGGLE_COMPETITION} (train.csv, "
        "test.csv); needs its rules accepted on kaggle.com",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "explore":
        explore(args.csv or find_data("train"), args.out_dir, draw=not args.no_plots)
    else:
        found = download(args.dest, unzip=not args.no_unzip, competition=args.competition)
        print("downloaded: " + ", ".join(str(p) for p in found))


if __name__ == "__main__":
    run_cli(main)
