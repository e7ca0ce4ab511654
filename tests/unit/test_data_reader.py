"""The DATA reader passes content on as it arrives: whatever the chunking and whenever
the content is taken, the pieces put together are the message a whole-buffer reading
gives, with the same verdicts (end, bare CR/LF, size cap, Received: count)."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gsmtp.protocol.data import DataReader

END = b"\r\n.\r\n"
TINY_PIECE = 32  # the shortest line piece: long lines are cut mid-line often


@dataclass(frozen=True)
class Reading:
    content: bytes
    too_big: bool
    bare: bool
    received: int
    leftover: bytes


def whole(stream: bytes, max_size: int = 1 << 30) -> Reading:
    """The reference: the whole stream at once, as RFC 5321 reads it."""
    raw = b"\r\n" + stream
    end = raw.find(END)
    assert end >= 0
    region = raw[: end + 2]
    leftover = raw[end + len(END) :]
    if len(region) - 2 > max_size:
        return Reading(b"", True, False, 0, leftover)
    body = region[2:]
    crlf = body.count(b"\r\n")
    bare = body.count(b"\n") != crlf or body.count(b"\r") != crlf
    content = region.replace(b"\r\n.", b"\r\n")[2:]
    # The header section ends at the first empty line (RFC 5322 §2.1).
    first_empty = (b"\r\n" + content).find(b"\r\n\r\n")
    header = content if first_empty < 0 else content[:first_empty]
    received = len(re.findall(rb"^received:", header, re.IGNORECASE | re.MULTILINE))
    if bare:  # refused at the end: what it held does not matter
        return Reading(b"", False, True, 0, leftover)
    return Reading(content, False, bare, received, leftover)


def chunked(
    stream: bytes, cuts: list[int], *, take_at: set[int] | None = None, **kwargs: int
) -> Reading:
    """Feed `stream` cut at `cuts`, taking content after the chunks in `take_at` (all
    of them by default)."""
    reader = DataReader(kwargs.get("max_size", 1 << 30), line_piece=kwargs.get("piece", 8192))
    taken = []
    bounds = [0, *sorted(cuts), len(stream)]
    for index, (start, stop) in enumerate(itertools.pairwise(bounds)):
        result, leftover = reader.feed(stream[start:stop])
        if result is not None:
            rest = stream[stop:]
            if result.bare_line_ending:
                return Reading(b"", False, True, 0, leftover + rest)
            return Reading(
                b"".join(taken) + result.content,
                result.too_big,
                result.bare_line_ending,
                result.received_headers,
                leftover + rest,
            )
        if take_at is None or index in take_at:
            taken.append(reader.take_content())
        assert reader.buffered >= 0
    raise AssertionError("no end found")


EXAMPLES = {
    "plain": b"Subject: x\r\n\r\nhello\r\n.\r\n",
    "stuffed": b"..From: x\r\n\r\n.y\r\n..x\r\n..\r\n...\r\n.\r\nMAIL FROM:<a@b>\r\n",
    "empty": b".\r\n",
    "empty line only": b"\r\n.\r\n",
    "no header": b"\r\nReceived: not a header\r\n.\r\n",
    "received": b"Received: a\r\nreceived: b\r\nX: y\r\n.Received: c\r\n..Received: d\r\n"
    b"\r\nReceived: body\r\n.\r\n",
    "bare lf": b"a\nb\r\n.\r\n",
    "bare cr": b"a\rb\r\n.\r\n",
    "bare lf dot lf": b"a\r\n\n.\n\r\nb\r\n.\r\nQUIT\r\n",
    "cr before crlf": b"a\r\r\n.\r\n",
    "lf dot crlf": b"x\n.\r\nRCPT TO:<b@c>\r\n\r\n.\r\n",
    "dots near the end": b"a.\r\n.a\r\n..\r\n.\r\n",
    "long line": b"Subject: " + b"x" * 70 + b"\r\n\r\n" + b"." + b"y" * 90 + b"\r\n.\r\n",
    "long header line then received": b"X: " + b"z" * 80 + b"\r\nReceived: r\r\n\r\n.\r\n",
    "crs in a long line": b"a" * 40 + b"\r" * 50 + b"\r\n" + b"b" * 40 + b"\r\n.\r\n",
    # The searches go first to the next dot: dots inside lines before a line start's,
    # and long runs with none.
    "dots inside lines first": b"a.b.\r\nc.\r\n" + b"x" * 90 + b"\r\n..y\r\nz.\r\n.\r\nNOOP\r\n",
    # DOT_TRIES (16) dots that begin no line, a stuffed line right after the last.
    "as many dots as are tried inside lines": b"ab." * 16 + b"\r\n..z\r\n" + b"w." * 20 + END,
    # More stuffed lines than are cut out one by one (STUFFED_ONE_BY_ONE, 16).
    "many stuffed lines": b"a\r\n" + b"..\r\n.x\r\n...\r\n" * 7 + b"y.\r\n..\r\n" + END,
    "a stuffed line, then text with no dot": b"..a\r\n" + (b"x" * 30 + b"\r\n") * 4 + b".\r\n",
}


@pytest.mark.parametrize("name", EXAMPLES)
def test_every_split_position_reads_like_the_whole(name: str) -> None:
    stream = EXAMPLES[name]
    expected = whole(stream)
    for piece in (TINY_PIECE, 8192):
        for cut in range(1, len(stream)):
            assert chunked(stream, [cut], piece=piece) == expected, (cut, piece)
            assert chunked(stream, [cut], take_at=set(), piece=piece) == expected, (cut, piece)


@pytest.mark.parametrize("name", EXAMPLES)
def test_one_byte_at_a_time_with_a_take_after_each(name: str) -> None:
    stream = EXAMPLES[name]
    for piece in (TINY_PIECE, 8192):
        assert chunked(stream, list(range(1, len(stream))), piece=piece) == whole(stream)


def test_every_pair_of_split_positions_of_a_stuffed_message() -> None:
    stream = EXAMPLES["stuffed"]
    expected = whole(stream)
    for first in range(1, len(stream)):
        for second in range(first, len(stream)):
            assert chunked(stream, [first, second]) == expected, (first, second)


def test_a_bare_lf_is_found_across_cuts_and_inside_long_lines() -> None:
    """A CR and an LF in different chunks are still one pair; a CR at the end of one
    chunk and anything but LF at the start of the next is a bare CR."""
    pair_split = b"a\r" + b"\nb\r\n.\r\n"
    assert chunked(pair_split, [2]).bare is False
    cr_then_x = b"a\r" + b"xb\r\n.\r\n"
    assert chunked(cr_then_x, [2]).bare is True
    long_bare = b"y" * 200 + b"\n" + b"y" * 200 + b"\r\n.\r\n"
    for cut in range(1, len(long_bare)):
        assert chunked(long_bare, [cut], piece=TINY_PIECE).bare is True, cut


def test_content_is_taken_as_it_arrives_and_memory_stays_small() -> None:
    """Taking after each chunk leaves only a line's tail behind, however long the body
    and its lines."""
    reader = DataReader(1 << 30, line_piece=1024)
    line = b"x" * 5000 + b"\r\n"
    taken = 0
    for _ in range(200):
        result, _ = reader.feed(line)
        assert result is None
        taken += len(reader.take_content())
        assert reader.buffered <= 1024 + 8
    result, _ = reader.feed(END[2:])
    assert result is not None
    assert taken + len(result.content) == result.size == 200 * len(line)


def test_over_the_cap_nothing_is_kept_while_streaming_and_the_end_is_still_found() -> None:
    reader = DataReader(10_000)
    chunk = b"z" * 1000 + b"\r\n"
    for index in range(100):
        result, _ = reader.feed(chunk)
        assert result is None
        if index > 10:
            assert reader.doomed
            assert reader.take_content() == b""
            assert reader.buffered < 2 * len(chunk)
    result, leftover = reader.feed(b".\r\nQUIT\r\n")
    assert result is not None and result.too_big and result.content == b""
    assert leftover == b"QUIT\r\n"


def test_exactly_at_the_cap_is_accepted() -> None:
    body = b"a" * 98 + b"\r\n"  # 100 bytes with its CRLF, stuffed size as received
    for cut in range(1, len(body) + 3):
        assert chunked(body + b".\r\n", [cut], max_size=100).too_big is False
        assert chunked(body + b".\r\n", [cut], max_size=99).too_big is True


def test_a_bare_line_ending_dooms_the_message_and_drops_its_content() -> None:
    reader = DataReader(1 << 30)
    reader.feed(b"a\nb\r\nmore\r\n")
    assert reader.doomed
    assert reader.take_content() == b""


_ALPHABET = st.sampled_from([b"\r", b"\n", b".", b"a", b"\r\n", b"\r\n.", b"Received:", b" "])


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(_ALPHABET, max_size=60),
    cuts=st.lists(st.integers(min_value=1, max_value=400), max_size=6),
    takes=st.sets(st.integers(min_value=0, max_value=7)),
)
def test_any_chunking_reads_like_the_whole(
    parts: list[bytes], cuts: list[int], takes: set[int]
) -> None:
    stream = b"".join(parts) + END + b"NOOP\r\n"
    cuts = [c for c in cuts if c < len(stream)]
    expected = whole(stream)
    assert chunked(stream, cuts, take_at=takes, piece=TINY_PIECE) == expected
    assert chunked(stream, cuts, take_at=takes) == expected
