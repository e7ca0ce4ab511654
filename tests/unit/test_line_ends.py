"""The bare line end check against its definition (a CR or LF outside every CRLF), on
data long enough to reach past the density sample, so both of its ways are checked:
by rebuilding the line ends (sparse ones) and by deleting CR and LF (dense ones)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gsmtp.protocol.line_ends import DENSE_LINE, SAMPLE, has_bare_line_end


def by_definition(data: bytes) -> bool:
    outside_pairs = data.replace(b"\r\n", b"")
    return b"\r" in outside_pairs or b"\n" in outside_pairs


TEXT_LINE = b"x" * 76 + b"\r\n"
_PIECES = st.sampled_from(
    [b"\r", b"\n", b"\r\n", b"x", b"\x0b", b"\x0c", b"\x1c", b"\x85", TEXT_LINE, b"y" * 700]
)


@settings(max_examples=400, deadline=None)
@given(
    head=st.sampled_from([b"", TEXT_LINE * 14, b"\r\n" * 600, b"ab\r\n" * 300]),
    parts=st.lists(_PIECES, max_size=40),
)
def test_every_cr_and_lf_outside_a_crlf_is_found_past_the_sample(
    head: bytes, parts: list[bytes]
) -> None:
    """The heads fill the sample with text lines, with empty lines, with short lines,
    or leave it to the parts; the parts (other control bytes among them, which are no
    line ends) may be anywhere."""
    data = head + b"".join(parts)
    assert has_bare_line_end(data) == by_definition(data)


@given(
    st.binary(max_size=300) | st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"x"])).map(b"".join)
)
def test_short_data_against_the_definition(data: bytes) -> None:
    """Data shorter than the sample, arbitrary bytes or CR, LF and CRLF jumbled: the
    check's short path (it was in test_maildir_pieces, the definition written again)."""
    assert has_bare_line_end(data) == by_definition(data)


@pytest.mark.parametrize("line", [b"\r\n", b"ab\r\n", TEXT_LINE, b"z" * 5000 + b"\r\n"])
@pytest.mark.parametrize(
    ("bare", "where"),
    [(b"\r", 0.5), (b"\n", 0.5), (b"\n\r", 0.99), (b"\r", 1.0), (b"\n", 0.0), (b"", 0.5)],
)
def test_a_single_bare_line_end_anywhere_in_64_kib(line: bytes, bare: bytes, where: float) -> None:
    """One bare CR or LF (or LF CR: two bare ones, as many CRs and LFs as a pair has)
    at the start, in the middle, near or at the end of 64 KiB of dense or sparse
    lines; and none at all."""
    lines = line * (65536 // len(line))
    at = int(len(lines) * where)
    at -= at % len(line)  # between two lines
    data = lines[:at] + bare + lines[at:]
    assert has_bare_line_end(data) is bool(bare)


def test_the_sample_decides_the_way_at_its_density_bound() -> None:
    """Both sides of the bound give the same answers (the sample only picks the way)."""
    per_line = DENSE_LINE
    for length in (per_line - 1, per_line, per_line + 1):
        line = b"q" * (length - 2) + b"\r\n"
        data = line * (2 * SAMPLE // length)
        assert not has_bare_line_end(data)
        assert has_bare_line_end(data + b"q\r")
        assert has_bare_line_end(b"\n" + data)
