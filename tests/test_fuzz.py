"""Inputs under random damage (Hypothesis): whatever bytes a CSV holds, reading it gives images
and labels of the right form or the one-line UserError, never another exception and never an
error line over a few hundred printable characters; damage that cannot be a CSV of digits is
always refused; harmless variations read as the file itself. The same for images in every
format and mode Pillow writes, damaged or not, for checkpoints with any field replaced by junk,
and for ONNX exports with junk metadata."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from conftest import csv_text, make_table
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import dataset
import images
import model
from cli import MAX_ERROR_CHARS, UserError

TABLE = make_table(4, seed=3)
VALID = csv_text(TABLE, dataset.LAYOUTS["mnist-in-csv"][0]).encode()
CASES = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def read(data: bytes) -> dataset.CSVData | str:
    """What the reader makes of `data`: the parsed CSV, or the message of its UserError."""
    try:
        return dataset.parse_csv_bytes(data, "fuzz.csv")
    except UserError as e:
        return str(e)


def assert_well_formed(result: dataset.CSVData | str) -> None:
    if isinstance(result, str):
        assert len(result) <= MAX_ERROR_CHARS
        assert result.isprintable()
        assert result.startswith("fuzz.csv")
        return
    assert result.images.dtype == np.uint8
    assert result.images.shape[1:] == (28, 28)
    assert result.labels is None or set(result.labels.tolist()) <= set(range(10))


edits = st.lists(
    st.tuples(
        st.sampled_from(["replace", "insert", "delete"]),
        st.integers(0, len(VALID) - 1),
        st.binary(min_size=1, max_size=4),
    ),
    min_size=1,
    max_size=6,
)


def damaged(data: bytes, changes) -> bytes:
    for kind, at, new in changes:
        at = min(at, len(data))
        if kind == "replace":
            data = data[:at] + new + data[at + len(new) :]
        elif kind == "insert":
            data = data[:at] + new + data[at:]
        else:
            data = data[:at] + data[at + len(new) :]
    return data


@CASES
@given(edits)
@example([("replace", 5356, b"\x1c")])  # Unicode whitespace that float() does not strip
def test_damage_reads_as_a_csv_of_digits_or_one_short_printable_error(changes):
    assert_well_formed(read(damaged(VALID, changes)))


@CASES
@given(
    st.integers(0, len(VALID)), st.sampled_from([b"#", b"@", b"!", b"%", b"&", b"?", b"~", b"z"])
)
def test_a_byte_no_csv_of_digits_can_hold_is_always_refused(at, poison):
    result = read(VALID[:at] + poison + VALID[at:])
    assert isinstance(result, str)


@settings(max_examples=200, deadline=None)
@given(
    st.booleans(),
    st.booleans(),
    st.integers(0, 3),
    st.sampled_from([b",", b";", b"\t"]),
    st.booleans(),
)
def test_harmless_variations_read_as_the_file_itself(bom, crlf, blank_lines, separator, quotes):
    data = VALID
    if quotes:
        data = (
            b"\n".join(
                b",".join(b'"' + cell + b'"' for cell in line.split(b","))
                for line in data.splitlines()
            )
            + b"\n"
        )
    data = data.replace(b",", separator)
    if crlf:
        data = data.replace(b"\n", b"\r\n")
    data = (b"\xef\xbb\xbf" if bom else b"") + data + b"\n" * blank_lines
    result = read(data)
    assert not isinstance(result, str), result
    np.testing.assert_array_equal(result.images.reshape(4, -1), TABLE[:, 1:])
    np.testing.assert_array_equal(result.labels, TABLE[:, 0])


# ---------------------------------------------------------------- images


def assert_one_line(error: UserError, name: str) -> None:
    message = str(error)
    assert len(message) <= MAX_ERROR_CHARS and message.isprintable() and message.startswith(name)


MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"]
IMAGE_FORMATS = ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "ICO", "TGA", "PCX"]


def encoded_image(fmt: str, mode: str, side: int, seed: int) -> bytes | None:
    """A random image in `mode` saved as `fmt`, or None where Pillow cannot write that pair."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    gray = Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8))
    try:
        img = gray.convert(mode)
        buffer = io.BytesIO()
        img.save(buffer, fmt)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return buffer.getvalue()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(IMAGE_FORMATS),
    st.sampled_from(MODES),
    st.integers(1, 64),
    st.integers(0, 2**16),
    edits,
    st.booleans(),
)
def test_any_image_or_its_damage_is_a_digit_or_one_short_line(fmt, mode, side, seed, changes, harm):
    data = encoded_image(fmt, mode, side, seed)
    if data is None:
        return
    if harm:
        data = damaged(data, [(kind, at % max(1, len(data)), new) for kind, at, new in changes])
    try:
        digit = images.preprocess_image(io.BytesIO(data), name="fuzz.img")
    except UserError as e:
        assert_one_line(e, "fuzz.img")
        return
    assert digit.shape == (28, 28) and digit.dtype == np.uint8
    assert fmt in images.FORMATS  # a format outside the list is never read


# ---------------------------------------------------------------- checkpoint and ONNX fields

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.one_of(st.integers(-3, 12), st.text(max_size=3)), max_size=12),
    st.dictionaries(st.text(max_size=8), st.integers(-3, 3), max_size=3),
    st.builds(lambda n: torch.full((n,), float(n)), st.integers(0, 4)),
)
FIELDS = ["format", "arch", "arch_kwargs", "state_dict", "mean", "std", "class_names",
          "temperature", "history", "data", "config", "seen_rows", "curves", "epoch"]  # fmt: skip


@pytest.fixture(scope="module")
def real_checkpoint(sample_model) -> dict:
    return model.load_checkpoint(sample_model)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(st.sampled_from(FIELDS), JUNK, min_size=1, max_size=3))
def test_any_checkpoint_field_is_loaded_or_refused_in_one_line(real_checkpoint, tmp_path, junk):
    path = tmp_path / "fuzz.pt"
    model.save_checkpoint(path, {**real_checkpoint, **junk})
    try:
        ckpt = model.load_checkpoint(path)
        model.model_from_checkpoint(ckpt, path)
    except UserError as e:
        assert_one_line(e, str(path))


@pytest.fixture(scope="module")
def real_export(sample_model, tmp_path_factory) -> str:
    import predict

    path = tmp_path_factory.mktemp("fuzz-onnx") / "model.onnx"
    predict.main(["--checkpoint", sample_model, "--export", str(path)])
    return str(path)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.dictionaries(
        st.sampled_from(["class_names", "models", "mirror", "seen_rows", "format"]),
        st.one_of(st.text(max_size=20), JUNK.map(lambda v: json.dumps(v, default=str))),
        min_size=1,
        max_size=2,
    )
)
def test_any_onnx_metadata_is_loaded_or_refused_in_one_line(real_export, tmp_path, junk):
    import onnx

    import onnx_model

    exported = onnx.load(real_export)
    props = {p.key: p.value for p in exported.metadata_props}
    onnx.helper.set_model_props(exported, {**props, **junk})
    path = tmp_path / "fuzz.onnx"
    onnx.save(exported, path)
    try:
        onnx_model.OnnxEnsemble(str(path))
    except UserError as e:
        assert_one_line(e, str(path))
