"""Maildir write_content's piecewise path against the small-message path (header +
without_fields(body) with CRLF made LF), and the line-end helpers it relies on."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gsmtp.delivery.maildir import WRITE_PIECE, to_lf, write_content
from gsmtp.protocol.line_ends import has_bare_line_end
from gsmtp.protocol.trace import without_fields

HEADER = b"Return-Path: <a@b.example>\n"
MiB = 1024 * 1024


def _written(tmp_path: Path, body: bytes) -> bytes:
    target = tmp_path / "file"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        write_content(fd, HEADER, body)
    finally:
        os.close(fd)
    return target.read_bytes()


def test_a_body_cut_into_pieces_is_written_as_the_small_path_would(tmp_path: Path) -> None:
    """A CRLF split between two pieces (its CR the last byte of one) still becomes one
    LF: the pieces are converted alone."""
    kept = b"Subject: big\r\n\r\n"
    body = kept + b"a" * (WRITE_PIECE - len(kept) - 1) + b"\r\n" + b"b" * 100 + b"\r\n"
    assert body[WRITE_PIECE - 1 : WRITE_PIECE + 1] == b"\r\n"
    written = _written(tmp_path, body)
    assert written == HEADER + without_fields(body).replace(b"\r\n", b"\n")
    assert b"\r" not in written


@pytest.mark.parametrize(
    ("first", "line"),
    [
        pytest.param(
            b"Delivered-To: planted@example.com\r\nSubject: big\r\n\r\n",
            b"y" * 76 + b"\r\n",
            id="planted",
        ),
        pytest.param(b"Subject: big\r\n", b"y" * 76 + b"\r\n", id="no-blank-line"),
        pytest.param(b"Subject: big\r\n\r\n", b"\r\n", id="empty-lines"),
        pytest.param(b"Subject: big\r\n\r\n", b"ab\r\n", id="short-lines"),
    ],
)
def test_a_large_body_is_not_copied_whole_by_the_maildir_write(
    tmp_path: Path, first: bytes, line: bytes
) -> None:
    """README: 'a Maildir delivery converts and writes a large body in 32 KB pieces, so
    it holds no second copy'. without_fields copies the whole body when a planted field is there
    (twice: the join and the slice) or when there is no blank line (head.lower() of the
    whole content). The conversion to LF splits a piece into its lines: a body of empty
    or very short lines (the most objects a piece can become) stays bounded too."""
    body = first + line * (16 * MiB // len(line))
    fd = os.open(tmp_path / "file", os.O_WRONLY | os.O_CREAT, 0o600)
    tracemalloc.start()
    try:
        write_content(fd, HEADER, body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        os.close(fd)
    assert (tmp_path / "file").read_bytes() == HEADER + without_fields(body).replace(b"\r\n", b"\n")
    assert peak < 2 * MiB, f"{peak / MiB:.1f} MiB held for a {len(body) / MiB:.0f} MiB body"


_LINE_END_PIECES = st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"x"])).map(b"".join)


@given(st.binary(max_size=300) | _LINE_END_PIECES)
def test_to_lf_turns_each_crlf_into_lf_and_drops_every_stray_cr(body: bytes) -> None:
    """Content as the spool holds it (no bare CR or LF) gets LF line ends; a stray CR,
    which the spool never holds, is dropped rather than written into an LF file."""
    assert to_lf(body) == body.replace(b"\r", b"")
    assert to_lf(memoryview(body)) == body.replace(b"\r", b"")
    if not has_bare_line_end(body):
        assert to_lf(body) == body.replace(b"\r\n", b"\n")
