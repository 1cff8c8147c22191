"""The CSV reader under random damage (Hypothesis): whatever bytes a file holds, reading it gives
images and labels of the right form or the one-line UserError, never another exception and
never an error line over a few hundred printable characters; damage that cannot be a CSV of
digits is always refused; harmless variations read as the file itself."""

from __future__ import annotations

import numpy as np
from conftest import csv_text, make_table
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import dataset
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
