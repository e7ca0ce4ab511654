"""The PROXY protocol header parser (HAProxy proxy-protocol.txt, v1 and v2), fed bytes."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest

from gsmtp.protocol.proxy import (
    NEED_MORE,
    V1_MAX_LENGTH,
    V2_MAX_LENGTH,
    V2_SIGNATURE,
    Endpoint,
    ProxyError,
    ProxyHeader,
    ProxyHeaderParser,
    ProxyResult,
)

SMTP = b"EHLO client.example\r\n"


def feed_all(data: bytes) -> ProxyResult:
    return ProxyHeaderParser().feed(data)


def feed_bytewise(data: bytes) -> tuple[ProxyResult, int]:
    """Feed one byte at a time; the result and how many bytes were fed to get it."""
    parser = ProxyHeaderParser()
    result: ProxyResult = NEED_MORE
    for index in range(len(data)):
        result = parser.feed(data[index : index + 1])
        if result is not NEED_MORE:
            return result, index + 1
    return result, len(data)


def v2(
    command: int = 0x1,
    family: int = 0x11,
    addresses: bytes = b"",
    tlvs: bytes = b"",
    version: int = 2,
    length: int | None = None,
) -> bytes:
    payload = addresses + tlvs
    size = len(payload) if length is None else length
    return (
        V2_SIGNATURE + bytes([version << 4 | command, family]) + struct.pack("!H", size) + payload
    )


def inet(source: str, destination: str, sport: int, dport: int) -> bytes:
    return (
        ip_address(source).packed
        + ip_address(destination).packed
        + struct.pack("!HH", sport, dport)
    )


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


# -- version 1 -------------------------------------------------------------------------


def test_v1_tcp4_names_the_client_and_leaves_what_follows() -> None:
    header = b"PROXY TCP4 192.0.2.7 198.51.100.25 56324 25\r\n"
    result = feed_all(header + SMTP)
    assert result == ProxyHeader(
        version=1,
        length=len(header),
        source=Endpoint(IPv4Address("192.0.2.7"), 56324),
        destination=Endpoint(IPv4Address("198.51.100.25"), 25),
    )


def test_v1_tcp6() -> None:
    header = b"PROXY TCP6 2001:db8::7 2001:db8::25 65535 587\r\n"
    result = feed_all(header)
    assert isinstance(result, ProxyHeader)
    assert result.source == Endpoint(IPv6Address("2001:db8::7"), 65535)
    assert result.destination == Endpoint(IPv6Address("2001:db8::25"), 587)


@pytest.mark.parametrize(
    "header",
    [
        b"PROXY UNKNOWN\r\n",
        b"PROXY UNKNOWN whatever follows is ignored\r\n",
        # The longest line the spec allows: exactly 107 bytes.
        b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
        b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
    ],
)
def test_v1_unknown_names_no_client(header: bytes) -> None:
    assert len(header) <= V1_MAX_LENGTH
    assert feed_all(header + SMTP) == ProxyHeader(version=1, length=len(header))


def test_the_longest_v1_line_is_107_bytes() -> None:
    header = (
        b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
        b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"
    )
    assert len(header) == V1_MAX_LENGTH == 107


def test_v1_byte_at_a_time_needs_more_until_the_crlf() -> None:
    header = b"PROXY TCP4 192.0.2.7 198.51.100.25 56324 25\r\n"
    result, fed = feed_bytewise(header + SMTP)
    assert fed == len(header)
    assert isinstance(result, ProxyHeader) and result.length == len(header)


@pytest.mark.parametrize(
    "truncated",
    [b"", b"P", b"PROXY", b"PROXY TCP4 192.0.2.7 198.51.100.25 56324 25", b"PROXY TCP4 1\r"],
)
def test_v1_truncated_needs_more(truncated: bytes) -> None:
    assert feed_all(truncated) is NEED_MORE


def test_v1_without_crlf_within_107_bytes_is_refused() -> None:
    parser = ProxyHeaderParser()
    assert parser.feed(b"PROXY UNKNOWN " + b"x" * 92) is NEED_MORE  # 106 bytes
    result = parser.feed(b"x")
    assert isinstance(result, ProxyError) and "107" in result.reason


def test_v1_oversized_even_with_a_later_crlf_is_refused() -> None:
    result = feed_all(b"PROXY UNKNOWN " + b"x" * 100 + b"\r\n")
    assert isinstance(result, ProxyError)


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 192.0.2.7 198.51.100.25 56324\r\n",  # a field missing
        b"PROXY TCP4 192.0.2.7 198.51.100.25 56324 25 extra\r\n",
        b"PROXY TCP4  192.0.2.7 198.51.100.25 56324 25\r\n",  # two spaces
        b"PROXY tcp4 192.0.2.7 198.51.100.25 56324 25\r\n",
        b"PROXY UDP4 192.0.2.7 198.51.100.25 56324 25\r\n",
        b"PROXY TCP4 2001:db8::7 198.51.100.25 56324 25\r\n",  # family mismatch
        b"PROXY TCP6 192.0.2.7 2001:db8::25 56324 25\r\n",
        b"PROXY TCP4 192.0.2.256 198.51.100.25 56324 25\r\n",
        b"PROXY TCP4 192.0.2.07 198.51.100.25 56324 25\r\n",  # leading zero
        b"PROXY TCP6 fe80::1%eth0 2001:db8::25 56324 25\r\n",  # scope id
        b"PROXY TCP4 192.0.2.7 198.51.100.25 65536 25\r\n",
        b"PROXY TCP4 192.0.2.7 198.51.100.25 0123 25\r\n",
        b"PROXY TCP4 192.0.2.7 198.51.100.25 -1 25\r\n",
        b"PROXY TCP4 192.0.2.7 198.51.100.25 +1 25\r\n",
        b"PROXY TCP4 192.0.2.7 198.51.100.25 56324 25\n",  # bare LF
        b"PROXY TCP4 \xff.0.2.7 198.51.100.25 56324 25\r\n",
        b"PROXY\r\n",
    ],
)
def test_v1_malformed_is_refused(line: bytes) -> None:
    assert isinstance(feed_all(line), ProxyError)
    result, _ = feed_bytewise(line)
    assert isinstance(result, ProxyError)


@pytest.mark.parametrize("data", [b"EHLO client.example\r\n", b"QUIT\r\n", b"PROXZ", b"\x16\x03"])
def test_anything_else_is_refused_at_its_first_wrong_byte(data: bytes) -> None:
    result, fed = feed_bytewise(data)
    assert isinstance(result, ProxyError)
    assert fed == next(i for i in range(len(data)) if not _could_be_header(data[: i + 1])) + 1


def _could_be_header(prefix: bytes) -> bool:
    return b"PROXY ".startswith(prefix) or V2_SIGNATURE.startswith(prefix)


# -- version 2 -------------------------------------------------------------------------


def test_v2_tcp4() -> None:
    header = v2(family=0x11, addresses=inet("192.0.2.7", "198.51.100.25", 40000, 25))
    assert feed_all(header + SMTP) == ProxyHeader(
        version=2,
        length=len(header),
        source=Endpoint(IPv4Address("192.0.2.7"), 40000),
        destination=Endpoint(IPv4Address("198.51.100.25"), 25),
    )


def test_v2_tcp6_with_tlvs_skips_them() -> None:
    tlvs = tlv(0x01, b"smtp") + tlv(0x02, b"mx.example") + tlv(0x05, b"\x00" * 40)
    addresses = inet("2001:db8::7", "2001:db8::25", 1, 25)
    header = v2(family=0x21, addresses=addresses, tlvs=tlvs)
    result = feed_all(header + SMTP)
    assert isinstance(result, ProxyHeader)
    assert result.length == len(header) == 16 + 36 + len(tlvs)
    assert result.source == Endpoint(IPv6Address("2001:db8::7"), 1)


def test_v2_byte_at_a_time() -> None:
    header = v2(addresses=inet("192.0.2.7", "198.51.100.25", 40000, 25), tlvs=tlv(4, b"x" * 9))
    result, fed = feed_bytewise(header + SMTP)
    assert fed == len(header)
    assert isinstance(result, ProxyHeader) and result.source is not None
    assert result.source.ip == IPv4Address("192.0.2.7")


def test_v2_local_uses_the_connection_itself() -> None:
    """LOCAL (a health check from the balancer): the address block is ignored."""
    header = v2(command=0x0, family=0x11, addresses=inet("192.0.2.7", "192.0.2.8", 1, 2))
    assert feed_all(header) == ProxyHeader(version=2, length=len(header), local=True)
    bare = v2(command=0x0, family=0x00)
    assert feed_all(bare) == ProxyHeader(version=2, length=16, local=True)


@pytest.mark.parametrize("family", [0x00, 0x31])
def test_v2_unspec_and_unix_name_no_client(family: int) -> None:
    header = v2(family=family, addresses=b"\x00" * (216 if family == 0x31 else 0))
    assert feed_all(header) == ProxyHeader(version=2, length=len(header))


@pytest.mark.parametrize("size", [0, 1, 15, 16, 27])
def test_v2_truncated_needs_more(size: int) -> None:
    header = v2(addresses=inet("192.0.2.7", "198.51.100.25", 40000, 25))
    assert feed_all(header[:size]) is NEED_MORE


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (v2(version=1, addresses=inet("192.0.2.7", "192.0.2.8", 1, 2)), "version"),
        (v2(command=0x2, addresses=inet("192.0.2.7", "192.0.2.8", 1, 2)), "command"),
        (v2(family=0x41, addresses=b"\x00" * 12), "family"),
        (v2(family=0x12, addresses=inet("192.0.2.7", "192.0.2.8", 1, 2)), "stream"),
        (v2(family=0x10, addresses=inet("192.0.2.7", "192.0.2.8", 1, 2)), "stream"),
        (v2(family=0x11, addresses=b"\x00" * 11), "too short"),
        (v2(family=0x21, addresses=inet("192.0.2.7", "192.0.2.8", 1, 2)), "too short"),
        (V2_SIGNATURE[:5] + b"X" + V2_SIGNATURE[6:], "not a PROXY header"),
    ],
)
def test_v2_malformed_is_refused(header: bytes, reason: str) -> None:
    result = feed_all(header)
    assert isinstance(result, ProxyError) and reason in result.reason
    result, _ = feed_bytewise(header)
    assert isinstance(result, ProxyError)


def test_v2_oversized_is_refused_as_soon_as_its_length_is_read() -> None:
    """The 16-bit length could announce 64 KiB; past V2_MAX_LENGTH nothing more is read."""
    header = v2(addresses=inet("192.0.2.7", "192.0.2.8", 1, 2), length=V2_MAX_LENGTH)
    result, fed = feed_bytewise(header + b"\x00" * V2_MAX_LENGTH)
    assert isinstance(result, ProxyError) and "more than" in result.reason
    assert fed == 16


def test_v2_at_the_maximum_length_is_accepted() -> None:
    addresses = inet("192.0.2.7", "192.0.2.8", 1, 2)
    padding = V2_MAX_LENGTH - 16 - len(addresses) - 3
    header = v2(addresses=addresses, tlvs=tlv(0x04, b"\x00" * padding))  # PP2_TYPE_NOOP
    assert len(header) == V2_MAX_LENGTH
    result = feed_all(header)
    assert isinstance(result, ProxyHeader) and result.length == V2_MAX_LENGTH
